#!/usr/bin/env bash
# Starts the server on an artifact, measures retrieval quality through the Search RPC for every mode, stops it;
# then the condensed-list analysis (benchmarks/judged_only.py) in process.
set -euo pipefail
ARTIFACT=$1; JUDGMENTS=$2; OUT=${3:-runs/quality}
BIN=${BIN:-.venv/bin}
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$(dirname "$OUT")"
"$BIN/bundlerec-server" --artifact "$ARTIFACT" --port "$PORT" --host 127.0.0.1 >"$OUT.server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
"$BIN/python" -m benchmarks.quality --target "127.0.0.1:$PORT" --judgments "$JUDGMENTS" --split test --k 10 \
  --mode lexical --mode dense --mode hybrid --mode default --json "$OUT.json" --plot "$OUT.png"
# what unjudged products cost each ranking: condensed-list NDCG@10 and unjudged products in the top 10 (in process)
"$BIN/python" -m benchmarks.judged_only --artifact "$ARTIFACT" --judgments "$JUDGMENTS" --split test \
  --json "$OUT.judged-only.json" --plot "$OUT.judged-only.png"
