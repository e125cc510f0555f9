#!/usr/bin/env bash
# Starts the server on each artifact given, checks health, streams one Recommend and one Search, stops it.
set -euo pipefail
BIN=${BIN:-.venv/bin}
for ART in "$@"; do
  PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$BIN/bundlerec-server" --artifact "$ART" --host 127.0.0.1 --port "$PORT" > "/tmp/smoke-$PORT.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 120); do "$BIN/bundlerec" --target "127.0.0.1:$PORT" --timeout 1 health >/dev/null 2>&1 && break; sleep 0.5; done
  Q=${QUERY:-$(case "$ART" in *homedepot*) echo "cordless drill";; *icecat*) echo "laptop battery";; *) echo "pasta sauce";; esac)}
  echo "== $ART: $("$BIN/bundlerec" --target "127.0.0.1:$PORT" --json info | "$BIN/python" -c 'import sys, json; d=json.load(sys.stdin); print(d["artifactVersion"], d["itemCount"], "items", d["modelVariant"], d["executionProvider"])')"
  "$BIN/bundlerec" --target "127.0.0.1:$PORT" recommend "$Q" -n 2
  "$BIN/bundlerec" --target "127.0.0.1:$PORT" search "$Q" -k 3
  kill -TERM $PID; wait $PID || true
done
