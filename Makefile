# Everything runs from .venv, created from scratch when missing: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-torch demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[tensorflow,test]'
	touch $(STAMP)

# PyTorch stays out of the default install: CPU torch adds ~860 MB to .venv (26 s from a local
# wheel), and an unpinned `torch` from PyPI is a CUDA build of several GB.
TORCH ?= torch==2.13.0
TORCH_STAMP := $(VENV)/.torch
$(TORCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	touch $(TORCH_STAMP)

# -n auto: one worker per core (pytest-xdist); --dist loadfile keeps a file's tests on one
# worker, so a module's real models are built once, not once per worker.
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile

# Then the end-to-end tests that hold on every backend (marker `backends`) again under JAX;
# tests/conftest.py gives XLA two host devices there, for DataParallel.
test: $(STAMP)
	$(PYTEST)
	KERAS_BACKEND=jax $(PYTEST) -m backends

test-torch: $(TORCH_STAMP)
	KERAS_BACKEND=torch $(PYTEST) -m backends

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The demo's model, built once (ResNet50 takes some 20 s to build) and reused: plan and apply
# then read it through the archive engine, without TensorFlow. Order-only on the venv, so a
# reinstall does not rebuild it; written under a temporary name so an interrupted build leaves
# no file that make would take as done.
DEMO_MODEL := build/resnet50.keras

$(DEMO_MODEL): | $(STAMP)
	mkdir -p build
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -c "import keras; keras.applications.ResNet50(weights=None).save('$@.part.keras')"
	mv $@.part.keras $@

demo: $(DEMO_MODEL)
	mkdir -p build/demo
	$(BIN)/surgery plan specs/resnet50_finetune.frz $(DEMO_MODEL) --summary
	$(BIN)/surgery apply specs/resnet50_finetune.frz $(DEMO_MODEL) \
		-o build/demo/resnet50_tuned.keras --force

bench: $(STAMP)
	$(BIN)/python bench/bench_apply.py

clean:
	rm -rf build dist .pytest_cache
