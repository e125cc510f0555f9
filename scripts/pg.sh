#!/usr/bin/env bash
# A throwaway PostgreSQL for tests, CI and benchmarks, listening on 127.0.0.1 only.
#
#   scripts/pg.sh start DIR [PORT]   initdb DIR/data if needed (trust auth, user postgres; PORT: a free one
#                                    by default, kept in DIR/port), start; prints
#                                    `export BUNDLEREC_TEST_PG_DSN=... BUNDLEREC_TEST_PG_DIR=...` (eval it)
#   scripts/pg.sh stop DIR           fast shutdown
#   scripts/pg.sh restart DIR        stop (fast) + start
#   scripts/pg.sh dsn DIR            the connection URL
#
# As root (CI), the cluster runs as the `postgres` user, which owns DIR. Exits 3 when no PostgreSQL
# binary exists (looked up in $PG_BINDIR if set, else on PATH, then /usr/lib/postgresql/*/bin).
set -euo pipefail

cmd=${1:?usage: pg.sh start|stop|restart|dsn DIR [PORT]}
dir=${2:?usage: pg.sh start|stop|restart|dsn DIR [PORT]}
port=${3:-}
if [ -z "$port" ]; then  # a free loopback port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
fi

bindir=""
if [ -n "${PG_BINDIR:-}" ]; then  # this folder only (also: how to test the no-binary path)
    if [ -x "$PG_BINDIR/initdb" ] && [ -x "$PG_BINDIR/pg_ctl" ]; then bindir=$PG_BINDIR; fi
elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    bindir=$(dirname "$(command -v initdb)")
else
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then bindir=$d; break; fi
    done
fi
if [ -z "$bindir" ]; then
    echo "pg.sh: no PostgreSQL binary (initdb/pg_ctl) on PATH or in /usr/lib/postgresql/*/bin" >&2
    exit 3
fi

as_owner() {  # initdb and postgres refuse to run as root
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_start() {
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; chmod 700 "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bindir/initdb" -D "$dir/data" -A trust -U postgres --no-instructions >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
        echo "$port" >"$dir/port"
    fi
    port=$(cat "$dir/port")
    if as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then return 0; fi  # already running
    as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null \
        || { tail -n 20 "$dir/server.log" >&2; exit 1; }
}

pg_stop() {
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    fi
}

dsn() { echo "postgresql://postgres@127.0.0.1:$(cat "$dir/port")/postgres"; }

case $cmd in
    start) pg_start; echo "export BUNDLEREC_TEST_PG_DSN=$(dsn) BUNDLEREC_TEST_PG_DIR=$dir" ;;
    stop) pg_stop ;;
    restart) pg_stop; pg_start ;;
    dsn) dsn ;;
    *) echo "pg.sh: unknown command $cmd" >&2; exit 2 ;;
esac
