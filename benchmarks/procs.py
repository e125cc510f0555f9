"""Server subprocesses for tests and benchmarks: a free loopback port, and a server process (its own
session, output to a log file) that is always stopped. Product packages never import this."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server subprocess: ``start()`` it (or enter it as a context manager, which always stops it on exit),
    ``wait_serving()`` for its grpc.health.v1 SERVING, ``stop()`` it with SIGTERM (SIGKILL after ``timeout``)."""

    def __init__(self, argv: list[str], log_path: Path, *, target: str = "", name: str = "server",
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log_path, self.target = name, argv, Path(log_path), target
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                         start_new_session=True)
        return self

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, timeout: float = 60.0) -> ServerProcess:
        """Blocks until the server reports SERVING; RuntimeError if it exits first, TimeoutError after ``timeout``
        (both with its output)."""
        from benchmarks.load import wait_for_health

        try:
            wait_for_health(self.target, timeout, alive=self.alive)
        except (RuntimeError, TimeoutError) as exc:
            code = self.proc.returncode if self.proc is not None else None
            raise type(exc)(f"{self.name}: {exc} (exit code {code}): {self.output()}") from None
        return self

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (drain), SIGKILL if still running after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode
