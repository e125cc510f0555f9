#!/usr/bin/env bash
# Starts the server on the demo artifact, waits until it is SERVING, streams a few real queries through
# the client CLI, then stops the server with SIGTERM (graceful drain). Called by `make demo`.
set -euo pipefail
ARTIFACT=${1:-artifacts/demo}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG=$(mktemp -t bundlerec-demo.XXXXXX.log)

"$BIN/bundlerec-server" --artifact "$ARTIFACT" --port "$PORT" --host 127.0.0.1 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  if "$BIN/bundlerec" --target "127.0.0.1:$PORT" --timeout 1 health >/dev/null 2>&1; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "server exited:"; cat "$LOG"; exit 1; fi
  sleep 0.5
done
"$BIN/bundlerec" --target "127.0.0.1:$PORT" health >/dev/null || { echo "server never became SERVING:"; cat "$LOG"; exit 1; }

echo "== bundlerec demo: server on 127.0.0.1:$PORT (log: $LOG)"
"$BIN/bundlerec" --target "127.0.0.1:$PORT" info
for q in "pasta sauce" "organic baby spinach" "greek yogurt" "tortilla chips" "买一双好穿的鞋子"; do
  echo
  "$BIN/bundlerec" --target "127.0.0.1:$PORT" recommend "$q" --max-bundles 3
done
echo
echo "== personalized: the same query with a shopping history (item ids from the demo catalog)"
HIST=$("$BIN/bundlerec" --target "127.0.0.1:$PORT" --json search "chocolate ice cream" -k 2 | "$BIN/python" -c 'import sys, json; print(" ".join(json.loads(l)["itemId"] for l in sys.stdin))')
"$BIN/bundlerec" --target "127.0.0.1:$PORT" recommend "snacks" --max-bundles 3 --recent $HIST
echo
echo "== graceful stop (SIGTERM)"
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT
tail -n 3 "$LOG"
