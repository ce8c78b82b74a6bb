# `make test` and `make demo` work on a fresh machine: they create .venv and install the pinned
# dependencies (constraints.txt) before running.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip's own lines (what it collects, download bars, the build) show that set-up is moving.
PIP := $(PY) -m pip install --disable-pip-version-check -c constraints.txt

.PHONY: setup test lint docs demo demo-segment demo-detect fashion-mnist clean bench-gpu bench-gpu-dry

$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard src/involution/csrc/*.cpp src/involution/csrc/*.h)
	@echo "[1/3] virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "[2/3] torch + torchvision: several GB of wheels (about 7 min on a first run, seconds from pip's cache)"
	$(PIP) torch torchvision setuptools wheel ninja
	@echo "[3/3] involution[dev,onnx]: timm, onnxruntime, pytest, ... and the C++ extension build (about 5 min on 2 cores)"
	$(PIP) --no-build-isolation -e ".[dev,onnx]"
	touch $(STAMP)
	@echo "set-up done: $(VENV) is ready"

setup: $(STAMP)

# Fashion-MNIST too: the scenes, detection and segmentation tests train on the real data.
test: setup fashion-mnist
	$(PY) -m pytest -n 2 -q

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# The `docs` extra's requirements (read from the installed package's metadata, so the package
# and its C++ extension are not rebuilt), then the site with warnings as errors.
DOCS_STAMP := $(VENV)/.docs-installed
DOCS_REQUIREMENTS := $(PY) -c 'from importlib.metadata import requires; \
	print(" ".join(r.split(";")[0] for r in requires("involution") if "extra == \"docs\"" in r))'

$(DOCS_STAMP): $(STAMP)
	$(PIP) $$($(DOCS_REQUIREMENTS))
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# Fashion-MNIST for `make demo`: Debian's package when possible (as root, or with password-less
# sudo); otherwise `involution train` downloads it with torchvision when online.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
APT_INSTALL := apt-get install -y --no-install-recommends dataset-fashion-mnist

fashion-mnist:
	@if [ ! -d $(FASHION_MNIST_DIR) ] && command -v apt-get >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else echo "not root: skipping apt-get install dataset-fashion-mnist"; exit 0; fi; \
		$$SUDO $(APT_INSTALL) || { $$SUDO apt-get update && $$SUDO $(APT_INSTALL); } \
			|| echo "apt-get could not install dataset-fashion-mnist; trying a download"; \
	fi

# Train the default model (compact RedNet, Fashion-MNIST) from scratch and report test accuracy.
demo: setup fashion-mnist
	$(VENV)/bin/involution train

# Build the Fashion-MNIST scenes (once) and train the small RedNet Semantic FPN with the
# involution neck on them (CPU); reports mIoU and the per-class IoU table.
demo-segment: setup fashion-mnist
	$(VENV)/bin/involution train scenes_seg

# Build the Fashion-MNIST scenes (once) and train the small RedNet-FPN Faster R-CNN with the
# involution neck on them (CPU); reports the COCO box AP table.
demo-detect: setup fashion-mnist
	$(VENV)/bin/involution train scenes_det

# The prepared GPU run (involution bench gpu, at most 8 minutes): op tests on CUDA, every Triton
# variant on RedNet-50's layer shapes, the winner table, RedNet-50 vs ResNet-50. Runs with the
# machine's own Python (CUDA builds of torch and triton, timm, torchvision, pytest): no venv,
# nothing to build. A GPU session: make bench-gpu BENCH_OUT=$OUT/bench-gpu
BENCH_OUT ?= benchmarks/results/gpu
GPU_PYTHON ?= python3
bench-gpu:
	PYTHONPATH=src PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m involution.bench.gpu --out $(BENCH_OUT)

# The same pipeline on CPU under the Triton interpreter, tiny shapes: checks it, measures nothing.
bench-gpu-dry: setup
	TRITON_INTERPRET=1 $(PY) -m involution.bench.gpu --dry-run --out $(BENCH_OUT)-dry

clean:
	rm -rf $(VENV) build site src/*.egg-info src/involution/*.so
