#!/usr/bin/env bash
# Two artifacts at one open-loop rate, one query at a time: two servers started together, each RPC measured on
# each in turn, ROUNDS times (alternated, so the VM's drift hits both alike). JSON per run under OUT.
#   benchmarks/artifacts_rps.sh A B OUT QUERIES [RPS] [ROUNDS]        e.g. artifacts/homedepot runs/homedepot-l3
# RPCS (default "recommend search"; search runs --mode hybrid, the served fusion) and DURATION (20 s) as env.
set -euo pipefail
A=$1; B=$2; O=$3; Q=$4; RPS=${5:-100}; ROUNDS=${6:-2}; PY=${PY:-.venv/bin/python}
mkdir -p "$O"
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PA=$(port); PB=$(port)
$PY -m bundlerec_server --artifact "$A" --host 127.0.0.1 --port $PA >"$O/server-a.log" 2>&1 & SA=$!
$PY -m bundlerec_server --artifact "$B" --host 127.0.0.1 --port $PB >"$O/server-b.log" 2>&1 & SB=$!
trap 'kill -TERM $SA $SB 2>/dev/null || true; wait $SA $SB 2>/dev/null || true' EXIT
for p in $PA $PB; do $PY -c "from benchmarks.load import wait_for_health; wait_for_health('127.0.0.1:$p', 300)"; done
for round in $(seq 1 "$ROUNDS"); do
  for rpc in ${RPCS:-recommend search}; do
    for spec in "a $PA $SA" "b $PB $SB"; do
      set -- $spec
      extra=""; [ "$rpc" = search ] && extra="--mode hybrid"
      echo "== $rpc $1 round $round load: $(cut -d' ' -f1-3 /proc/loadavg)"
      $PY -m benchmarks.load --target 127.0.0.1:$2 --rps "$RPS" --duration "${DURATION:-20}" --rpc $rpc $extra \
        --queries "$Q" --server-pid $3 --json "$O/$rpc-$1-$round.json" 2>&1 | tail -4
    done
  done
done
echo "end load: $(cut -d' ' -f1-3 /proc/loadavg)"
