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
    from . import tracing
    from .app import serve

    try:
        tracing.configure(settings)
        asyncio.run(serve(settings))
    except (ArtifactError, EventStoreError) as exc:
        logging.getLogger("bundlerec_server").error("cannot serve: %s", exc)
        return 1
    finally:
        tracing.disable()  # flushes the spans not yet exported
    return 0


def supervise(settings: Settings, argv: list[str]) -> int:
    """Runs ``settings.workers`` server processes on one port (SO_REUSEPORT: the kernel spreads connections)
    and forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to them. With --metrics-port this process serves
    the workers' metrics aggregated (see metrics.py), and (with --events-db) all workers share the SQLite file
    (WAL allows it)."""
    import os
    import signal
    import subprocess
    import time

    log = logging.getLogger("bundlerec_server.supervisor")
    shared: dict[str, str] = {"BUNDLEREC_WORKERS": "1", "BUNDLEREC_SHARED_EVENTS": "1", "BUNDLEREC_METRICS_PORT": "0"}
    metrics_dir = None
    if settings.metrics_port:
        from .metrics import MultiprocDir, serve_metrics

        metrics_dir = MultiprocDir(settings.metrics_dir)
        shared.update(metrics_dir.worker_env())
        serve_metrics(settings.metrics_port, settings.metrics_host, metrics_dir.path)
        log.info("Prometheus metrics of all workers on http://%s:%d/metrics (files in %s)",
                 settings.metrics_host, settings.metrics_port, metrics_dir.path)
    args = _drop_values(argv, ("--workers", "--metrics-port"))
    procs = [subprocess.Popen([sys.executable, "-m", "bundlerec_server", *args], env={**os.environ, **shared})
             for _ in range(settings.workers)]
    log.info("started %d workers on port %d: pids %s", len(procs), settings.port, [p.pid for p in procs])

    def forward(sig: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(procs):
            for p in procs:
                if p.pid not in codes and p.poll() is not None:
                    codes[p.pid] = p.returncode
                    if metrics_dir is not None:
                        metrics_dir.process_dead(p.pid)
            time.sleep(0.1)
    finally:
        if metrics_dir is not None:
            metrics_dir.close()
    return max(codes.values())


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
