#!/usr/bin/env bash
# `make gpu-check`: build for the visible GPU's architecture only, run all tests, run the GPU benchmarks.
# Works offline. Results go to benchmarks/results/ and, when $OUT is set, are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Records name the commit; a copy of the tree without .git can pass it in E2EVLP_COMMIT.
export E2EVLP_COMMIT=${E2EVLP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
arch=$($PYTHON -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
echo "== building e2evlp._C for sm_${arch/./} with $(nproc) jobs"
rm -rf build
# An editable install (offline) builds _C in place and maps kernels/ to e2evlp.kernels.
TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=$(nproc) \
  $PYTHON -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 3
if compgen -G ".whl/*.whl" >/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --target /tmp/e2evlp-peers .whl/*.whl
  export PYTHONPATH="/tmp/e2evlp-peers${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON -m e2evlp info
mkdir -p benchmarks/results
status=0
echo "== tests"
$PYTHON -m pytest -q -p no:cacheprovider tests 2>&1 | tee benchmarks/results/gpu-check-tests.log | tail -n 15 || status=1
echo "== benchmarks"
$PYTHON -m benchmarks.bench_lsap --device cuda || status=1
$PYTHON -m benchmarks.bench_matcher --device cuda || status=1
$PYTHON -m benchmarks.bench_attention --device cuda || status=1
$PYTHON -m benchmarks.bench_train_step --device cuda || status=1
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*cuda* benchmarks/results/gpu-check-tests.log "$OUT"/ 2>/dev/null || true
fi
exit $status
