# The README's commands. `make test` and `make demo` set up everything they need on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export MAX_JOBS ?= 2

.PHONY: install test demo bench gpu-check clean

# torch first: the extension builds against the torch already installed (no build isolation).
install:
	$(PIP) install --quiet "setuptools>=64" wheel ninja
	$(PIP) install --quiet "torch>=2.11" torchvision numpy scipy tqdm transformers safetensors pillow
	$(PIP) install --quiet --no-build-isolation -e ".[test]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m e2evlp info
	$(PYTHON) -m benchmarks.bench_lsap --device all --quick
	$(PYTHON) -m benchmarks.bench_matcher --device all --quick
	$(PYTHON) -m benchmarks.bench_attention --device cpu --quick

bench: install
	$(PYTHON) -m benchmarks.bench_lsap --device all
	$(PYTHON) -m benchmarks.bench_matcher --device all
	$(PYTHON) -m benchmarks.bench_attention --device cpu
	$(PYTHON) -m benchmarks.bench_train_step --device all

# On a machine with an NVIDIA GPU and no network: build for that GPU only, run every test (the
# cuda-marked ones included) and the GPU benchmarks; results land in benchmarks/results/ (and $OUT).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info e2evlp/_C*.so e2evlp/_build_info.json
