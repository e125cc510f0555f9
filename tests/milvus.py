"""A real Milvus for the tests (pytest plugin, registered in conftest.py): Milvus Lite's gRPC server as its own
process on a free loopback port (``python -m milvus_lite server``), the same API a Milvus cluster serves.

``BUNDLEREC_TEST_MILVUS_URI`` (``milvus://host:port``) names a running Milvus instead. Tests are skipped only
when neither pymilvus nor milvus-lite is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MilvusLite:
    """``python -m milvus_lite server --host 127.0.0.1 --port P`` in a temporary data folder."""

    def __init__(self) -> None:
        from benchmarks.procs import free_port

        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bundlerec-milvus-"))
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def start(self) -> MilvusLite:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.dir / "data"),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Milvus Lite did not start on 127.0.0.1:{self.port}: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def milvus_uri() -> Iterator[str]:
    """``milvus://127.0.0.1:P`` of a Milvus serving for the whole session."""
    if os.environ.get("BUNDLEREC_TEST_MILVUS_URI"):
        yield os.environ["BUNDLEREC_TEST_MILVUS_URI"]
        return
    for module in ("pymilvus", "milvus_lite"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed: the Milvus backend tests need pymilvus and milvus-lite "
                        "(pip install pymilvus milvus-lite), or BUNDLEREC_TEST_MILVUS_URI naming a running Milvus")
    server = MilvusLite().start()
    try:
        yield server.uri
    finally:
        server.stop()
