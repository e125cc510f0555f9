"""``bundlerec-server --artifact DIR --port N`` (flags and BUNDLEREC_* variables: see --help)."""

from __future__ import annotations

import asyncio
import logging
import sys
from types import FrameType

from .artifact import ArtifactError
from .events import EventStoreError
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.load(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"bundlerec-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.workers > 1:
        return supervise(settings, sys.argv[1:] if argv is None else argv)
    from .app import serve

    try:
        asyncio.run(serve(settings))
    except (ArtifactError, EventStoreError) as exc:
        logging.getLogger("bundlerec_server").error("cannot serve: %s", exc)
        return 1
    return 0


def supervise(settings: Settings, argv: list[str]) -> int:
    """Runs ``settings.workers`` server processes on one port (SO_REUSEPORT: the kernel spreads connections)
    and forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to them. Worker i serves Prometheus metrics on
    metrics_port + i, and (with --events-db) all workers share the SQLite file (WAL allows it)."""
    import os
    import signal
    import subprocess

    log = logging.getLogger("bundlerec_server.supervisor")
    procs = []
    for i in range(settings.workers):
        env = {**os.environ, "BUNDLEREC_WORKERS": "1", "BUNDLEREC_SHARED_EVENTS": "1"}
        if settings.metrics_port:
            env["BUNDLEREC_METRICS_PORT"] = str(settings.metrics_port + i)
        args = _drop_values(argv, ("--workers", "--metrics-port"))
        procs.append(subprocess.Popen([sys.executable, "-m", "bundlerec_server", *args], env=env))
    log.info("started %d workers on port %d: pids %s", len(procs), settings.port, [p.pid for p in procs])

    def forward(sig: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    return max(codes)


def _drop_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
