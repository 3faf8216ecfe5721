# Everything runs from .venv, created from scratch when missing: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# -n auto: one worker per core (pytest-xdist); --dist loadfile keeps a file's tests on one
# worker, so a module's real models are built once, not once per worker.
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

demo: $(STAMP)
	mkdir -p build/demo
	$(BIN)/surgery plan specs/resnet50_finetune.frz keras.applications.ResNet50
	$(BIN)/surgery apply specs/resnet50_finetune.frz keras.applications.ResNet50 \
		-o build/demo/resnet50_tuned.keras --force

bench: $(STAMP)
	$(BIN)/python bench/bench_apply.py

clean:
	rm -rf build dist .pytest_cache
