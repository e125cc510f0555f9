"""Hot reload under load, refusal of broken artifacts, and SIGTERM drain with zero failed in-flight streams."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import signal
import threading
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, build_tiny_artifact, server_process, server_settings, wait_all_workers

from bundlerec import BundleRecError, Client
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec_server import artifact as A
from bundlerec_server.runtime import Runtime
from bundlerec_server.settings import Settings


@pytest.fixture(scope="module")
def second_artifact(artifact_root, tiny_artifact) -> Path:
    time.sleep(1.1)  # artifact versions carry the build time
    return build_tiny_artifact(artifact_root, name="tiny-b", complements="npmi", min_support=3)


class Load:
    """Sync clients streaming Recommend in a loop from threads; records failures and versions served."""

    def __init__(self, target: str, threads: int = 3, **kwargs) -> None:
        self.target, self.kwargs = target, kwargs
        self.failures: list[str] = []
        self.versions: list[str] = []
        self.calls = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with Client(self.target, timeout=10) as c:
            while not self._stop.is_set():
                try:
                    stream = c.recommend("organic", **self.kwargs)
                    n = len(list(stream))
                    with self._lock:
                        self.calls += 1
                        self.versions.append(stream.summary.artifact_version)
                        if stream.summary.bundles_sent != n:
                            self.failures.append("summary count mismatch")
                except BundleRecError as err:
                    with self._lock:
                        self.failures.append(str(err))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def wait_calls(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        start = self.calls
        while self.calls < start + n and time.monotonic() < end:
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=30)


def corrupt_copies(src: Path, root: Path) -> dict[str, Path]:
    out = {}
    bad_sum = root / "bad-checksum"
    shutil.copytree(src, bad_sum)
    blob = bytearray((bad_sum / A.INDEX).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad_sum / A.INDEX).write_bytes(bytes(blob))
    out["checksum"] = bad_sum
    missing = root / "missing-file"
    shutil.copytree(src, missing)
    (missing / A.COMPLEMENTS).unlink()
    out["missing"] = missing
    wrong_dim = root / "wrong-dim"
    shutil.copytree(src, wrong_dim)
    emb = np.load(wrong_dim / A.EMBEDDINGS)
    np.save(wrong_dim / A.EMBEDDINGS, np.hstack([emb, emb]))  # consistent checksums, wrong dimension
    manifest = json.loads((wrong_dim / A.MANIFEST).read_text())
    manifest.pop("files")
    manifest.pop("format_version")
    A.write_manifest(wrong_dim, manifest)
    out["dimension"] = wrong_dim
    return out


def test_hot_reload_under_load(tiny_artifact, second_artifact, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bundlerec_server")
    v1 = json.loads((tiny_artifact / A.MANIFEST).read_text())["artifact_version"]
    v2 = json.loads((second_artifact / A.MANIFEST).read_text())["artifact_version"]
    assert v1 != v2
    srv = ServerThread(server_settings(tiny_artifact)).start()
    try:
        with Load(srv.target, max_bundles=10) as load:
            load.wait_calls(30)
            assert srv.call(srv.app.runtime.reload(second_artifact)) is True
            load.wait_calls(30)
            for kind, broken in corrupt_copies(second_artifact, tmp_path).items():
                assert srv.call(srv.app.runtime.reload(broken)) is False, kind
                assert srv.app.runtime.engine().version == v2
            load.wait_calls(30)
        print(f"hot reload under load: {len(load.versions)} calls, {len(load.failures)} failed, 1 swap, 3 broken refused")
        assert load.failures == []
        assert v1 in load.versions and v2 in load.versions
        assert load.versions.index(v2) > load.versions.index(v1)
        assert load.versions[-1] == v2  # broken artifacts never took over
        refused = [r.getMessage() for r in caplog.records if "reload of" in r.getMessage() and "refused" in r.getMessage()]
        assert len(refused) == 3 and any("checksum" in m for m in refused)
    finally:
        srv.stop()


def test_watcher_follows_a_symlink_swap(tiny_artifact, second_artifact, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(tiny_artifact)
    srv = ServerThread(server_settings(link, watch_interval_s=0.1)).start()
    try:
        v2 = json.loads((second_artifact / A.MANIFEST).read_text())["artifact_version"]
        tmp_link = tmp_path / "current.new"
        tmp_link.symlink_to(second_artifact)
        tmp_link.replace(link)  # atomic rename: the deploy step
        end = time.monotonic() + 30
        while srv.app.runtime.engine().version != v2 and time.monotonic() < end:
            time.sleep(0.05)
        with Client(srv.target) as c:
            assert c.info().artifact_version == v2
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_streams(tiny_artifact):
    proc = server_process(tiny_artifact, "--grace-s", "10").wait_serving()
    results: list[tuple[str, int, bool]] = []  # (status, messages received, summary seen)
    lock = threading.Lock()
    stop = threading.Event()

    def streamer() -> None:
        with grpc.insecure_channel(proc.target) as ch:
            from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc

            stub = pb_grpc.BundleRecommenderStub(ch)
            while not stop.is_set():
                got, summary = 0, False
                try:
                    for msg in stub.Recommend(pb.RecommendRequest(query="organic", max_bundles=50), timeout=10):
                        got += 1
                        summary = summary or msg.HasField("summary")
                    status = "OK"
                except grpc.RpcError as err:
                    status = err.code().name
                with lock:
                    results.append((status, got, summary))
                if status != "OK":
                    return

    threads = [threading.Thread(target=streamer) for _ in range(4)]
    for t in threads:
        t.start()
    while len(results) < 40:
        time.sleep(0.01)
    proc.signal(signal.SIGTERM)
    rc = proc.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    ok = [r for r in results if r[0] == "OK"]
    # an in-flight stream is one the server had started answering: it must have completed with its summary
    broken = [r for r in results if r[1] > 0 and not (r[0] == "OK" and r[2])]
    refused = [r for r in results if r[0] != "OK" and r[1] == 0]
    print(f"SIGTERM drain: {len(ok)} streams completed, {len(broken)} in-flight failed, {len(refused)} refused after shutdown")
    assert rc == 0, proc.output()
    assert broken == []
    assert all(code in ("UNAVAILABLE", "CANCELLED") for code, _, _ in refused)
    assert "draining" in proc.output()


def test_workers_share_one_port_and_events(tiny_artifact, tmp_path):
    """--workers 2: two processes behind one port (SO_REUSEPORT); an event recorded through either
    personalises calls served by both; SIGTERM drains and stops them all."""
    from benchmarks.procs import free_port

    port = free_port()
    proc = server_process(tiny_artifact, "--workers", "2", "--events-db", str(tmp_path / "ev.sqlite3"), port=port).wait_serving()
    try:
        wait_all_workers(proc.target)
        with Client(proc.target) as c:
            item = c.search("organic", 1)[0].item_id
            assert c.record_events([pb.Event(user_id="multi", item_id=item, type=pb.EVENT_TYPE_PURCHASE)]).accepted == 1
        personalized = []
        for _ in range(8):  # new channels: connections land on either worker
            with Client(proc.target) as c:
                s = c.recommend("snacks", user_id="multi")
                list(s)
                personalized.append(s.summary.personalized)
        assert all(personalized)
        import subprocess

        pids = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(pids) == 2, (pids, proc.output()[-3000:])
    finally:
        assert proc.stop() == 0


def test_a_loaded_engine_leaves_the_cyclic_gc_yet_is_freed_when_replaced(tiny_artifact):
    """After a load the heap is frozen (full GC passes no longer walk the artifact's objects), so an engine
    must be freed by reference counting alone: no reference cycles, or every reload would leak one."""
    rt = Runtime(Settings(artifact=tiny_artifact, provider="cpu"))
    try:
        engine = rt.load(tiny_artifact)
        assert engine.lexical is not None
        titles = engine.catalog.titles
        assert gc.is_tracked(titles) and gc.get_freeze_count() > 0
        assert all(o is not titles for o in gc.get_objects())  # frozen: collections skip it
        engine.lexical.search("pasta sauce", 3)  # fills the query cache
        refs = [weakref.ref(o) for o in (engine, engine.lexical, engine.encoder, engine.catalog)]
        del engine, titles
        gc.disable()
        try:
            assert [r() for r in refs] == [None] * len(refs)
        finally:
            gc.enable()
    finally:
        rt.pool.shutdown()
