#!/usr/bin/env bash
# A py-spy flame graph of the real server under a fixed open-loop load (issue 13, item 2).
#   bash benchmarks/profile.sh [OUT.svg] [RPS] [SECONDS] [extra server args...]
# Starts bundlerec-server on a free loopback port (demo artifact unless ARTIFACT is set), waits for SERVING,
# drives it with benchmarks.load at RPS for SECONDS + 8, and records all its threads with
# `py-spy record -r 200 --nonblocking` into OUT (SVG), then 5 s more as folded stacks into runs/profile/ (sampling without stopping the process: no ptrace pauses skew
# the latency; needs ptrace permission, i.e. root or kernel.yama.ptrace_scope=0). Prints the load average.
set -euo pipefail
OUT=${1:-docs/img/flame-before.svg}
RPS=${2:-100}
SECS=${3:-15}
shift $(( $# > 3 ? 3 : $# )) || true
PY=${PYTHON:-.venv/bin/python}
PYSPY=${PYSPY:-$(dirname "$PY")/py-spy}
ARTIFACT=${ARTIFACT:-artifacts/demo}
command -v "$PYSPY" >/dev/null || { echo "py-spy not found ($PYSPY): pip install py-spy==0.4.3" >&2; exit 2; }
PORT=$("$PY" -c 'from benchmarks.procs import free_port; print(free_port())')
RUNS=${RUNS:-runs/profile}
mkdir -p "$RUNS"
LOG=$RUNS/server.log
HF_HUB_OFFLINE=1 "$PY" -m bundlerec_server --artifact "$ARTIFACT" --host 127.0.0.1 --port "$PORT" "$@" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
"$PY" -c "from benchmarks.load import wait_for_health; wait_for_health('127.0.0.1:$PORT', 120)"
"$PY" -m benchmarks.load --target "127.0.0.1:$PORT" --rps "$RPS" --duration $((SECS + 12)) --warmup 2 \
    --server-pid "$SERVER" --json "$RUNS/load.json" >"$RUNS/load.log" 2>&1 &
LOAD=$!
sleep 4  # past the warm-up
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$(dirname "$OUT")"
"$PYSPY" record -p "$SERVER" -r 200 -d "$SECS" --nonblocking --threads -o "$OUT"
"$PYSPY" record -p "$SERVER" -r 200 -d 5 --nonblocking --threads -f raw -o "$RUNS/$(basename "${OUT%.svg}").folded" >/dev/null 2>&1 || true
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
wait "$LOAD"
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print('server CPU ms/call', r['cpu']['server_ms_per_call'], 'full p50/p99', r['full_ms']['p50'], r['full_ms']['p99'])" "$RUNS/load.json"
