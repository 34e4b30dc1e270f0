#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU and no network, in under 8 minutes: build e2evlp._C for
# that GPU's architecture only, run the tests marked cuda or gpu_check, then `e2evlp bench all --device cuda --quick`.
# Results go to $E2EVLP_RESULTS_DIR (default benchmarks/results/): the day's records, tables and plot
# (<gpu>-<date>-quick.*), this run's (gpu-check.json/.md/.png, the skips included) and the logs; when $OUT
# is set, what this run wrote is copied there too. Each benchmark's records are saved as soon as it ends,
# so hitting the time limit ($GPU_CHECK_BUDGET_S, default 480) keeps the figures measured before it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
TESTS_MAX_S=150  # the cuda tests take well under a minute warm; the rest of the budget is the benchmarks'
export PYTHONUNBUFFERED=1
export E2EVLP_RESULTS_DIR=${E2EVLP_RESULTS_DIR:-benchmarks/results}
RESULTS=$E2EVLP_RESULTS_DIR
# Records name the commit; a copy of the tree without .git can pass it in E2EVLP_COMMIT.
export E2EVLP_COMMIT=${E2EVLP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$RESULTS"
started=$(mktemp)  # files under $RESULTS newer than this one are this run's

phase() { echo "== $1 (${SECONDS}s of ${BUDGET_S}s used)"; }
# Seconds left for a phase, capped at $1; never 0, which `timeout` reads as "no limit".
left() { local s=$((BUDGET_S - SECONDS - 10)); ((s > $1)) && s=$1; ((s > 5)) || s=5; echo "$s"; }

arch=$($PYTHON -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
phase "building e2evlp._C for sm_${arch/./} only, with $(nproc) jobs"
rm -rf build
# An editable install (offline) builds _C in place and maps kernels/ to e2evlp.kernels.
TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=$(nproc) \
  $PYTHON -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 3
# Peers shipped as wheels beside the tree (xformers, torch-linear-assignment, lap), installed offline.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --target /tmp/e2evlp-peers .whl/*.whl
  export PYTHONPATH="/tmp/e2evlp-peers${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON -m e2evlp info
status=0

phase "tests marked cuda or gpu_check"
tests_log="$RESULTS/gpu-check-tests.log"
if ! timeout "$(left $TESTS_MAX_S)" $PYTHON -m pytest -q -p no:cacheprovider -m "cuda or gpu_check" tests >"$tests_log" 2>&1; then
  status=1
fi
grep -E "^(SKIPPED|FAILED|ERROR)" "$tests_log" || true
tail -n 1 "$tests_log"

phase "benchmarks: e2evlp bench all --device cuda --quick"
outputs=(--out "$RESULTS" --json "$RESULTS/gpu-check.json" --markdown "$RESULTS/gpu-check.md")
if $PYTHON -c "import matplotlib" 2>/dev/null; then
  outputs+=(--plot "$RESULTS/gpu-check.png")
else
  echo "skipped: the plots (matplotlib is not installed)"
fi
if ! timeout "$(left 600)" $PYTHON -m e2evlp bench all --device cuda --quick "${outputs[@]}" \
    2>&1 | tee "$RESULTS/gpu-check-bench.log"; then
  status=1
  echo "the benchmarks failed or ran out of time: the finished ones are in $RESULTS/*-quick.json"
fi

phase "done, status $status"
if [ -n "${OUT:-}" ] && [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
  find "$RESULTS" -maxdepth 1 -type f -newer "$started" -exec cp {} "$OUT"/ \;
fi
rm -f "$started"
exit $status
