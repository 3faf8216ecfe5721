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

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	mkdir -p build/demo
	$(BIN)/surgery plan specs/resnet50_finetune.frz keras.applications.ResNet50
	$(BIN)/surgery apply specs/resnet50_finetune.frz keras.applications.ResNet50 \
		-o build/demo/resnet50_tuned.keras --force

bench: $(STAMP)
	$(BIN)/python bench/bench_apply.py

clean:
	rm -rf build dist .pytest_cache
