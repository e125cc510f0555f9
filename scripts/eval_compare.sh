#!/usr/bin/env bash
# Issue 5 comparison through the Search RPC, test split: zero-shot dense (fp32, int8) and fine-tuned dense
# (fp32, served int8) side by side, then BM25 / dense / hybrid (the served default) on the fine-tuned artifact,
# then the lexical channel and the hybrid without spelling correction, and the hybrid with the fp32 encoder.
# ZS = a zero-shot artifact: bundlerec-export --dataset homedepot --no-finetune --out artifacts/homedepot-zeroshot
set -euo pipefail
FT=${1:-artifacts/homedepot}; ZS=${2:-artifacts/homedepot-zeroshot}; J=${3:-../shared/data/homedepot/judgments.csv}
OUT=${4:-runs/quality-compare}; ZS_INT8=${ZS_INT8:-int8_pertoken}
BIN=${BIN:-.venv/bin}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
start() {  # artifact port variant [server flags]
  "$BIN/bundlerec-server" --artifact "$1" --host 127.0.0.1 --port "$2" --model-variant "$3" --provider cpu "${@:4}" > "/tmp/eval-$2.log" 2>&1 &
  pids+=($!)
}
start "$ZS" 50081 fp32; start "$ZS" 50082 "$ZS_INT8"; start "$FT" 50083 fp32; start "$FT" 50084 int8_pertoken
start "$FT" 50085 int8_pertoken --no-spell-correction
"$BIN/python" -m benchmarks.quality --judgments "$J" --split test --k 10 --mode dense \
  --target 127.0.0.1:50081 --label "zero-shot fp32" --target 127.0.0.1:50082 --label "zero-shot int8" \
  --target 127.0.0.1:50083 --label "fine-tuned fp32" --target 127.0.0.1:50084 --label "fine-tuned int8" \
  --json "$OUT-dense.json" --plot "$OUT-dense.png"
"$BIN/python" -m benchmarks.quality --judgments "$J" --split test --k 10 --target 127.0.0.1:50084 --label "fine-tuned" \
  --mode lexical --mode dense --mode hybrid --mode default --json "$OUT-modes.json" --plot "$OUT-modes.png"
"$BIN/python" -m benchmarks.quality --judgments "$J" --split test --k 10 --target 127.0.0.1:50085 \
  --label "no spelling correction" --mode lexical --mode hybrid --json "$OUT-nospell.json"
"$BIN/python" -m benchmarks.quality --judgments "$J" --split test --k 10 --target 127.0.0.1:50083 \
  --label "fine-tuned fp32 hybrid" --mode hybrid --json "$OUT-fp32-hybrid.json"
# The "BM25 (bm25s defaults)" baseline row needs an artifact whose lexical index uses bm25s's default token
# pattern (two or more characters): artifacts built before commit "Hybrid retrieval: exact-score fusion" have it.
