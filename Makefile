# The README's commands. `make test` and `make demo` set up everything they need on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export MAX_JOBS ?= 2

.PHONY: install test demo bench gpu-check kernels-inspect clean

# torch first: the extension builds against the torch already installed (no build isolation).
install:
	$(PIP) install --quiet "setuptools>=64" wheel ninja
	$(PIP) install --quiet "torch>=2.11" torchvision numpy scipy tqdm transformers safetensors pillow
	$(PIP) install --quiet --no-build-isolation -e ".[test]"

test: install
	$(PYTHON) -m pytest -q

# The main job on its embedded default: synthetic data, pre-train the tiny model, evaluate, write
# demo-output/results.json and demo-output/demo.png.
demo: install
	$(PYTHON) -m e2evlp info
	$(PYTHON) -m e2evlp demo --out demo-output

# Every benchmark on the CPU, then on the GPU when one is visible; records, tables and plots land in
# benchmarks/results/ (or $E2EVLP_RESULTS_DIR), one file per device and date. Peers that are not installed
# (the `bench` extra: lap, matplotlib for the plots; xformers, torch-linear-assignment) are listed as skipped.
bench: install
	$(PYTHON) -m e2evlp bench all --device all

# On a machine with an NVIDIA GPU and no network, in under 8 minutes: build for that GPU only, run the
# tests marked cuda or gpu_check and `e2evlp bench all --device cuda --quick`; results land in $E2EVLP_RESULTS_DIR
# (default benchmarks/results/) and, when $OUT is set, are copied there.
gpu-check:
	bash benchmarks/gpu_check.sh

# Every attention autotune candidate compiled for sm_90 and sm_80 (no GPU needed; ~20 min each on 2 cores):
# the records in benchmarks/inspect/, and the spill table the autotuner prunes by (kernels/attention_spills.json).
kernels-inspect: install
	$(PYTHON) -m e2evlp kernels inspect --arch 90 --features sweep --update-spill-table --json benchmarks/inspect/sweep-90.json >/dev/null
	$(PYTHON) -m e2evlp kernels inspect --arch 80 --features sweep --update-spill-table --json benchmarks/inspect/sweep-80.json >/dev/null

clean:
	rm -rf build *.egg-info e2evlp/_C*.so e2evlp/_build_info.json
