#!/usr/bin/env bash
# Quality through the Search RPC of two servers on one artifact (--fusion scores, --fusion learned), dev and test
# splits, plus the 30 queries where the scores fusion loses most to BM25 (with titles):
#   benchmarks/eval_learned.sh ARTIFACT JUDGMENTS [OUT]
set -euo pipefail
ART=$1; J=$2; OUT=${3:-runs/ltr}; PY=${PY:-.venv/bin/python}
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PS=$(port); PL=$(port)
$PY -m bundlerec_server --artifact "$ART" --port $PS --host 127.0.0.1 --fusion scores >"$OUT.scores.log" 2>&1 & S=$!
$PY -m bundlerec_server --artifact "$ART" --port $PL --host 127.0.0.1 --fusion learned >"$OUT.learned.log" 2>&1 & L=$!
trap 'kill -TERM $S $L 2>/dev/null || true; wait $S $L 2>/dev/null || true' EXIT
for split in dev test; do
  $PY -m benchmarks.quality --target 127.0.0.1:$PS --label scores --target 127.0.0.1:$PL --label learned \
    --judgments "$J" --split $split --k 10 --mode lexical --mode dense --mode hybrid --concurrency 8 \
    --losses "$OUT.$split.losses.txt" --losses-of "scores hybrid" --losses-vs "scores lexical" \
    --catalog "$(dirname "$J")/products.csv" --json "$OUT.$split.json" --plot "$OUT.$split.png"
done
uptime
