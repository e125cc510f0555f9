"""Shared fixtures: one tiny artifact per session (random tiny BERT + a real Instacart slice), and a real
grpc.aio server on a free loopback port running in its own thread and event loop."""

from __future__ import annotations

import asyncio
import csv
import os
import threading
from pathlib import Path

import pytest

from benchmarks.procs import ServerProcess, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["pg", "milvus"]  # real PostgreSQL (tests/pg.py) and Milvus Lite (tests/milvus.py) fixtures

TESTS = Path(__file__).parent
SLICE = TESTS / "data" / "instacart_slice"


def build_tiny_artifact(root: Path, name: str = "tiny", **overrides) -> Path:
    from bundlerec_export.build import BuildConfig, build_artifact
    from bundlerec_export.tiny import make_tiny_bert

    model = root / "tiny-bert"
    if not (model / "config.json").exists():
        make_tiny_bert(model)
    cfg = dict(dataset="instacart", data_dir=SLICE, out=root / name, base_model=model, min_int8_cosine=0.9,
               agreement_sample=64, min_support=2, progress=False)
    cfg.update(overrides)
    return build_artifact(BuildConfig(**cfg))


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_artifact(artifact_root) -> Path:
    return build_tiny_artifact(artifact_root)


class ServerThread:
    """Runs create_server + load in a private event loop so sync clients can call it from the test thread."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.app = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="grpc-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from bundlerec_server.app import create_server

        try:
            self._stopped = asyncio.Event()
            self.app = await create_server(self.settings)
            await self.app.server.start()
            await self.app.load()
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.app.stop(grace=1.0)

    def start(self) -> ServerThread:
        self.thread.start()
        self._ready.wait(timeout=120)
        if self._error:
            raise self._error
        return self

    def call(self, coro, timeout: float = 30.0):
        """Runs a coroutine on the server's loop (e.g. to inspect or swap state) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stop(self) -> None:
        if self._stopped is not None:
            self.loop.call_soon_threadsafe(self._stopped.set)
        self.thread.join(timeout=30)


def server_settings(artifact: Path, **overrides):
    from bundlerec_server.settings import Settings

    # the tiny random BERT's cosines carry no meaning: no relevance floor unless a test sets one
    overrides.setdefault("min_relevance", -1.0)
    return Settings(artifact=artifact, host="127.0.0.1", port=0, provider="cpu", intra_op_threads=1, **overrides)


@pytest.fixture(scope="session")
def server(tiny_artifact, tmp_path_factory):
    db = tmp_path_factory.mktemp("server-events") / "events.sqlite3"
    srv = ServerThread(server_settings(tiny_artifact, events_db=db)).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    from bundlerec import Client

    with Client(server.target, timeout=10.0) as c:
        yield c


def server_process(artifact: Path, *args: str, port: int | None = None, env: dict | None = None) -> ServerProcess:
    """A real ``bundlerec-server`` process, started (for signal tests: SIGTERM drain, SIGKILL durability)."""
    import sys

    port = port or free_port()
    argv = [sys.executable, "-m", "bundlerec_server", "--artifact", str(artifact), "--host", "127.0.0.1",
            "--port", str(port), "--provider", "cpu", "--intra-op-threads", "1", "--min-relevance", "-1", *args]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bundlerec-server-{port}.log"
    return ServerProcess(argv, log, target=f"127.0.0.1:{port}", env=env).start()


def wait_all_workers(target: str, in_a_row: int = 8, timeout: float = 60.0) -> None:
    """With --workers N, health is answered by whichever worker is up; the others may still be loading
    (UNAVAILABLE, retryable). Waits until ``in_a_row`` calls over fresh connections, which land on any worker,
    succeed one after another."""
    import time

    import grpc

    from bundlerec import BundleRecError, Client

    deadline, ok = time.monotonic() + timeout, 0
    while ok < in_a_row:
        assert time.monotonic() < deadline, "not every worker became ready"
        try:
            with Client(target) as c:
                c.search("organic", 1)
            ok += 1
        except BundleRecError as err:
            assert err.code == grpc.StatusCode.UNAVAILABLE, err
            ok = 0
            time.sleep(0.2)


def write_judgments(items: list[dict], path: Path) -> Path:
    """Synthetic graded judgments: the title's first two words find the item (3); its third word alone, if any,
    finds it less well (2); one unrelated item per query is judged irrelevant (1)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "product_id", "relevance"])
        for i, it in enumerate(items):
            words = it["title"].lower().split()
            w.writerow([" ".join(words[:2]), it["id"], 3.0])
            w.writerow([" ".join(words[:2]), items[(i * 7 + 3) % len(items)]["id"], 1.0])
            if len(words) > 2:
                w.writerow([words[2], it["id"], 2.0])
    return path


@pytest.fixture(scope="module")
def cache_on_off(tiny_artifact):
    """Two real servers on the tiny artifact, query cache on (64) and off; fresh for each test module."""
    on = ServerThread(server_settings(tiny_artifact, query_cache_size=64)).start()
    off = ServerThread(server_settings(tiny_artifact, query_cache_size=0)).start()
    yield on, off
    on.stop()
    off.stop()
