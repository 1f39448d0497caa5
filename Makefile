# The two commands of the README:
#   make run   - set up, then serve all services on the bundled data and show recommendations
#   make test  - set up, then run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GENERATED := recsys/.generated
ENCODER := model_repo/text_encoder/1/encoder.json
export HF_HUB_OFFLINE := 1

.PHONY: setup run test protos export bench clean

setup: $(INSTALLED) $(GENERATED) $(ENCODER)

$(INSTALLED): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	# The checkout itself goes on sys.path, so the generated recsys/ package is
	# importable without reinstalling after each protoc run.
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/recsys-checkout.pth"
	touch $@

# Generated code never enters git: it is rebuilt from protos/ here.
$(GENERATED): $(INSTALLED) $(PROTOS)
	rm -rf recsys
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	find recsys -type d -exec touch {}/__init__.py \;
	touch $@

protos: $(GENERATED)

$(ENCODER): $(INSTALLED)
	$(PY) -m recsys_core.export

export: $(ENCODER)

run: setup
	$(VENV)/bin/recsys serve $(RUN_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/recommend.py

clean:
	rm -rf recsys .cache var reports
