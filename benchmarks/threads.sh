#!/usr/bin/env bash
# Server CPU per call split by thread (issue 13): which thread pays for a call, from /proc/PID/task/*/stat.
#   bash benchmarks/threads.sh CODE_TREE [RPS] [SECONDS] [extra server args...]
# Starts the server from CODE_TREE (its server/export/client packages on PYTHONPATH: e.g. /work/main for the
# "before" code, . for this checkout) on the demo artifact, drives it open-loop with benchmarks.load
# (all-unique queries, cache off), and prints each thread's utime+stime over SECONDS divided by the calls
# scheduled in that time (RPS x SECONDS), then the load average. Thread names: the event loop is the
# first "python" thread (the process id), the encode workers are the busy "python" threads after it.
# SERVER_ENV="NAME=VALUE ..." sets environment variables for the server alone (e.g. GLIBC_TUNABLES).
set -euo pipefail
TREE=$(cd "${1:?code tree}" && pwd)
RPS=${2:-100}
SECS=${3:-15}
shift $(( $# > 3 ? 3 : $# )) || true
PY=${PYTHON:-.venv/bin/python}
HERE=$(pwd)
export HF_HUB_OFFLINE=1
PORT=$(PYTHONPATH=$HERE "$PY" -c 'from benchmarks.procs import free_port; print(free_port())')
RUNS=${RUNS:-runs/threads}
mkdir -p "$RUNS"
# shellcheck disable=SC2086 # SERVER_ENV is a list of NAME=VALUE words
PYTHONPATH=$TREE/server:$TREE/export:$TREE/client:$TREE env ${SERVER_ENV:-} "$PY" -m bundlerec_server --artifact "${ARTIFACT:-artifacts/demo}" \
    --host 127.0.0.1 --port "$PORT" --query-cache-size 0 "$@" >"$RUNS/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
export PYTHONPATH=$HERE/server:$HERE/export:$HERE/client:$HERE
"$PY" -c "from benchmarks.load import wait_for_health; wait_for_health('127.0.0.1:$PORT', 120)"
"$PY" -m benchmarks.load --target "127.0.0.1:$PORT" --rps "$RPS" --duration $((SECS + 6)) --warmup 2 \
    --query-mix unique --json "$RUNS/load.json" >"$RUNS/load.log" 2>&1 &
LOAD=$!
sleep 6  # past the warm-up and the first second
snap() { for t in /proc/"$SERVER"/task/*; do echo "$(basename "$t") $(tr ' ' _ <"$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
snap >"$RUNS/a"; sleep "$SECS"; snap >"$RUNS/b"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
wait "$LOAD"
TICK=$(getconf CLK_TCK)
join <(awk '{print $1"_"$2, $3}' "$RUNS/a") <(awk '{print $1"_"$2, $3}' "$RUNS/b") |
    awk -v n=$((RPS * SECS)) -v tick="$TICK" -v pid="$SERVER" '
        {d = ($3 - $2) * 1000 / tick / n; tot += d; split($1, a, "_"); if (d >= 0.02) printf "  %-8s %-14s %5.2f ms/call%s\n", a[1], a[2], d, (a[1] == pid ? "  (event loop)" : "")}
        END {printf "  all threads             %5.2f ms/call\n", tot}'
