#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU and no network, in under 8 minutes: build e2evlp._C for
# that GPU's architecture only, run the tests marked cuda or gpu_check, then `e2evlp bench all --device cuda --quick`.
# Results go to $E2EVLP_RESULTS_DIR (default benchmarks/results/): the day's records, tables and plot
# (<gpu>-<date>-quick.*), this run's (gpu-check.json/.md/.png, the skips included) and the logs; when $OUT
# is set, what this run wrote is copied there too, however the run ends. Each benchmark's records are saved as soon as it ends,
# so hitting the time limit ($GPU_CHECK_BUDGET_S, default 480) keeps the figures measured before it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
TESTS_MAX_S=170  # with one config per kernel pass (no tuning), a cold start compiles ~3 kernels per shape
export PYTHONUNBUFFERED=1
export E2EVLP_RESULTS_DIR=${E2EVLP_RESULTS_DIR:-benchmarks/results}
RESULTS=$E2EVLP_RESULTS_DIR
# Records name the commit; a copy of the tree without .git can pass it in E2EVLP_COMMIT.
export E2EVLP_COMMIT=${E2EVLP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$RESULTS"
started=$(mktemp)  # files under $RESULTS newer than this one are this run's
# Whatever ends the run (a failed step under set -e, the time limit), what it wrote reaches $OUT.
copy_out() {
  if [ -n "${OUT:-}" ] && [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
    find "$RESULTS" -maxdepth 1 -type f -newer "$started" -exec cp {} "$OUT"/ \;
  fi
  rm -f "$started"
}
trap copy_out EXIT

phase() { echo "== $1 (${SECONDS}s of ${BUDGET_S}s used)"; }
# Seconds left for a phase, capped at $1; never 0, which `timeout` reads as "no limit".
left() { local s=$((BUDGET_S - SECONDS - 10)); ((s > $1)) && s=$1; ((s > 5)) || s=5; echo "$s"; }

arch=$($PYTHON -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
phase "building e2evlp._C for sm_${arch/./} only, with $(nproc) jobs"
rm -rf build
build_log="$RESULTS/gpu-check-build.log"
export TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=$(nproc)
# An editable install (offline) builds _C in place and maps kernels/ to e2evlp.kernels. Where pip refuses
# (an externally managed Python, an old setuptools), build in place and link kernels/ into the package.
if ! $PYTHON -m pip install --no-build-isolation --no-deps --no-index -e . >"$build_log" 2>&1 &&
   ! $PYTHON -m pip install --no-build-isolation --no-deps --no-index --break-system-packages -e . \
       >>"$build_log" 2>&1; then
  echo "pip could not install the checkout (see $build_log): building in place"
  $PYTHON setup.py build_ext --inplace >>"$build_log" 2>&1 || { tail -n 30 "$build_log"; exit 1; }
  [ -e e2evlp/kernels ] || ln -s ../kernels e2evlp/kernels
fi
tail -n 2 "$build_log"
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
# The quick files first, the attention ones (a kernel compile per shape) last; one config per kernel pass,
# not a tuning run per shape: these tests judge correctness, the benchmarks below tune.
test_files=$(ls tests/test_*.py | grep -v attention; ls tests/test_attention*.py)
if ! E2EVLP_ATTENTION_AUTOTUNE=0 timeout "$(left $TESTS_MAX_S)" $PYTHON -m pytest -q -p no:cacheprovider \
    -m "cuda or gpu_check" $test_files >"$tests_log" 2>&1; then
  status=1
fi
grep -E "^(SKIPPED|FAILED|ERROR)" "$tests_log" || true
tail -n 1 "$tests_log"

phase "compiled evidence under this Triton: offered candidates that spill (e2evlp kernels inspect --check)"
inspect_arch=$([ "${arch%%.*}" -ge 9 ] && echo 90 || echo 80)
if ! timeout "$(left 90)" $PYTHON -m e2evlp kernels inspect --arch "$inspect_arch" --head-dim 64,128 \
    --features kpm,kpm-dropout --causal no --offered-only --check --workers "$(nproc)" \
    --json "$RESULTS/gpu-check-inspect.json" >"$RESULTS/gpu-check-inspect.log" 2>&1; then
  status=1
  grep "OFFERED AND SPILLING" "$RESULTS/gpu-check-inspect.log" || tail -n 5 "$RESULTS/gpu-check-inspect.log"
fi

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
exit $status
