#!/usr/bin/env bash
# The image's contents without a Docker engine: repeats deploy/Dockerfile's builder steps into a scratch
# virtual environment (same constraints, same protoc command, ./client ./server only), then runs the
# server from it with only the base ConfigMap's environment, a token file and an artifact behind a
# `current` symlink (an artifact with a learned ranker), and checks (deploy/image_smoke.py): no
# torch/transformers/scipy installed, health
# SERVING once warm, a call with the token, refusal without it, a hot reload on a symlink swap, metrics,
# and a clean exit on SIGTERM.
#   usage: bash deploy/image_smoke.sh [SCRATCH_DIR]     (about 2-3 minutes; needs PyPI or its mirror)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}          # the dev venv: builds the tiny artifact, runs the client
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK/src"
cp -r "$ROOT/requirements.txt" "$ROOT/proto" "$ROOT/client" "$ROOT/server" "$WORK/src/"
rm -f "$WORK"/src/client/bundlerec/v1/*_pb2*
cd "$WORK/src"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HNSWLIB_NO_NATIVE=1
# --- the builder stage, step by step (keep in step with deploy/Dockerfile)
sed -E 's/\[[^]]*\]//' requirements.txt > constraints.txt
"$PY" -m venv "$WORK/protoc"
"$WORK/protoc/bin/pip" install -q -c constraints.txt grpcio-tools
"$PY" -m venv "$WORK/bundlerec"
"$WORK/protoc/bin/python" -m grpc_tools.protoc -I proto --python_out=client --pyi_out=client \
    --grpc_python_out=client proto/bundlerec/v1/bundlerec.proto
"$WORK/bundlerec/bin/pip" install -q -c constraints.txt ./client ./server
# --- a tiny artifact from the test fixtures, served as /…/artifacts/current
cd "$ROOT"
# with a learned ranker, so the image must load lightgbm and compile the trees (lleaves) as a Home Depot-like
# artifact needs
PYTHONPATH="$ROOT/server:$ROOT/export:$ROOT/client:$ROOT/tests" "$PY" -c "
import json; from pathlib import Path; from conftest import build_tiny_artifact, write_judgments
plain = build_tiny_artifact(Path('$WORK/artifacts'), name='plain', lexical=True)
items = [json.loads(line) for line in (plain / 'items.jsonl').read_text().splitlines()]
build_tiny_artifact(Path('$WORK/artifacts'), name='v1', ranker_judgments=write_judgments(items, Path('$WORK/judgments.csv')))"
ln -sfn v1 "$WORK/artifacts/current"
PYTHONPATH="$ROOT/client" "$PY" "$ROOT/deploy/image_smoke.py" "$WORK"
