# The two commands of the README:
#   make run   - set up, then serve all services on the bundled data and show recommendations
#   make test  - set up, then run the test suite
# and the load test (a few minutes; reports in reports/, see loadtest/README.md):
#   make loadtest [LOADTEST_ARGS="--rates 50,100,200,400 --seconds 20"]
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GENERATED := recsys/.generated
ENCODER := model_repo/text_encoder/1/encoder.json
# The ensemble's members hold version 1's export (recsys_core/models/export.py).
ENSEMBLE_MEMBERS := model_repo/text_encoder_onnx/1/encoder.json
REVIEW_MODEL := model_repo/review_sentiment/1/classifier.json
# The full public data beside the clone when it is there, else the bundled subsets.
SHARED_DATA := $(abspath ../shared/data)
RETAIL_DATA := $(if $(wildcard $(SHARED_DATA)/online-retail/*.parquet),$(SHARED_DATA)/online-retail,data/online-retail)
AMAZON_DATA := $(if $(wildcard $(SHARED_DATA)/amazon-2014/interactions.csv.gz),$(SHARED_DATA)/amazon-2014,data)
export HF_HUB_OFFLINE := 1

.PHONY: setup run test protos export bench loadtest clean redis-server value-model buf api-baseline edge

setup: $(INSTALLED) $(GENERATED) $(ENCODER) $(ENSEMBLE_MEMBERS) $(REVIEW_MODEL) value-model redis-server buf edge

# The review classifier Triton serves (model_repo/review_sentiment): the quick
# recipe (fixed steps, a few minutes on two cores) on ../shared/data/reviews
# when it is beside the clone, else the bundled sample. Triton refuses to
# start while a model of its repository has no weights. The reported figures
# come from the full recipe (docs/profiles.md).
$(REVIEW_MODEL): $(INSTALLED) $(GENERATED)
	$(VENV)/bin/recsys train-reviews --quick

# The churn and lifetime-value model GetProfile serves (docs/profiles.md),
# trained once per machine into the cache (~/.cache/recsys/value).
value-model: $(INSTALLED) $(GENERATED)
	@if ! $(PY) -c 'from recsys_core.signals.value import ValueModel; ValueModel.load()' 2>/dev/null; then \
		echo "training the churn and lifetime-value model on $(RETAIL_DATA) and $(AMAZON_DATA)"; \
		$(VENV)/bin/recsys train-value --data $(RETAIL_DATA) --histories $(AMAZON_DATA) > /dev/null; \
	fi

# The tests run the profile service's Redis event store against a real
# redis-server, which they start themselves on a free loopback port (never as
# a system service). Installed from Debian's packages when missing: CI runs as
# root; elsewhere through sudo. RUNLEVEL=1 keeps the package from starting a
# system-wide server. RECSYS_REDIS_SERVER may name another binary instead.
# Without one, setup only warns: `make run` does not need it, and the tests
# skip the Redis store (under CI, where CI is set, they fail instead).
redis-server:
	@if [ -z "$$RECSYS_REDIS_SERVER" ] && ! command -v redis-server >/dev/null; then \
		echo "installing redis-server (apt-get)"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		log=$$(mktemp); \
		if ! { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
				apt-get install -y -qq --no-install-recommends redis-server; } >"$$log" 2>&1; then \
			cat "$$log" >&2; \
			echo "WARNING: could not install redis-server: the Redis store's tests will be skipped (they fail under CI)." >&2; \
			echo "Install it (apt-get install redis-server) or set RECSYS_REDIS_SERVER to a redis-server binary." >&2; \
		fi; \
		rm -f "$$log"; \
	fi

# buf into .tools/bin (once, from the Go module proxy): the test suite lints
# protos/ with it and checks the public API (recsys.gateway.v1) for breaking
# changes against protos/baseline/ (tests/test_api_contract.py).
buf:
	bash scripts/install_buf.sh

# recsys-edge (edge/main.go, Go's standard library only) into .tools/bin: the
# gateway's front that refuses oversized requests unread. Without Go,
# `recsys serve` runs without it and says so.
edge: $(INSTALLED)
	@$(PY) -m recsys_cli.edge || echo "WARNING: recsys-edge not built: recsys serve runs the gateway without it" >&2

# Regenerates the committed baseline of the public API. Only deliberately,
# after an additive change to recsys.gateway.v1 (protos/baseline/README.md).
api-baseline: buf
	.tools/bin/buf build protos --type recsys.gateway.v1 --exclude-source-info -o protos/baseline/recsys.gateway.v1.yaml

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
	$(PY) -m recsys_core.models.export

# A checkout exported before the ensemble existed: the export fills the members in.
$(ENSEMBLE_MEMBERS): $(ENCODER)
	$(PY) -m recsys_core.models.export

export: $(ENCODER) $(ENSEMBLE_MEMBERS)

# TRACING=otlp|file|console: OpenTelemetry spans of every service (docs/operations.md, "Tracing").
run: setup
	$(VENV)/bin/recsys serve $(if $(TRACING),--tracing $(TRACING)) $(RUN_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The full Amazon data when ../shared is beside the clone (the figures in
# docs/performance.md), else the bundled subset; BENCH_ARGS adds options.
bench: setup
	$(PY) bench/recommend.py --data $(AMAZON_DATA) $(BENCH_ARGS)

# ghz into .tools/bin (once, from the Go module proxy), the request data from
# data/, then bounded ghz runs against the local stack and the echo ceiling.
loadtest: setup
	bash scripts/install_ghz.sh
	$(PY) loadtest/make_data.py
	$(PY) loadtest/run.py $(LOADTEST_ARGS)

clean:
	rm -rf recsys .cache var reports
