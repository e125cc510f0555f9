"""RecordEvents: validation, durability before acknowledgement, personalization, crash recovery."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from conftest import ServerThread, server_process, server_settings

from bundlerec import BundleRecError, Client
from bundlerec.v1 import bundlerec_pb2 as pb


@pytest.fixture(scope="module")
def events_server(tiny_artifact, tmp_path_factory):
    db = tmp_path_factory.mktemp("events") / "events.sqlite3"
    srv = ServerThread(server_settings(tiny_artifact, events_db=db)).start()
    yield srv, db
    srv.stop()


def ev(user: str, item: str, kind=pb.EVENT_TYPE_PURCHASE) -> pb.Event:
    return pb.Event(user_id=user, item_id=item, type=kind)


def stored(db) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT user_id, item_id, type FROM events ORDER BY id").fetchall()


def test_events_are_stored_and_personalize(events_server):
    srv, db = events_server
    with Client(srv.target) as c:
        items = [h.item_id for h in c.search("cantaloupe", 3)]
        before = c.recommend("snacks", user_id="shopper-1")
        list(before)
        assert not before.summary.personalized  # unknown user: served, not personalized
        resp = c.record_events([ev("shopper-1", items[0], pb.EVENT_TYPE_VIEW), ev("shopper-1", items[1]), ev("shopper-1", "nope")])
        assert resp.accepted == 2 and resp.unknown_items == 1
        assert ("shopper-1", items[1], pb.EVENT_TYPE_PURCHASE) in stored(db)  # durable once acknowledged
        after = c.recommend("snacks", user_id="shopper-1")
        list(after)
        assert after.summary.personalized


def test_invalid_event_rejects_the_whole_call(events_server):
    srv, db = events_server
    n = len(stored(db))
    with Client(srv.target) as c, pytest.raises(BundleRecError) as info:
        c.record_events([ev("u2", "196"), pb.Event(user_id="bad user", item_id="196"), ev("u2", "196")])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in info.value.field_violations} == {"events[1].user_id", "events[1].type"}
    assert len(stored(db)) == n  # all or nothing


def test_events_disabled_is_failed_precondition(tiny_artifact):
    srv = ServerThread(server_settings(tiny_artifact)).start()
    try:
        with Client(srv.target) as c, pytest.raises(BundleRecError) as info:
            c.record_events([ev("u", "196")])
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop()


def test_acknowledged_events_survive_sigkill(tiny_artifact, tmp_path):
    """Streams of events from 4 threads; SIGKILL mid-way; every acknowledged event is in the database after restart."""
    db = tmp_path / "events.sqlite3"

    def present() -> set[tuple[str, str]]:
        with sqlite3.connect(db) as conn:
            return set(conn.execute("SELECT user_id, item_id FROM events").fetchall())

    sigkill_mid_stream(tiny_artifact, str(db), present)


def sigkill_mid_stream(artifact, events_db: str, present: Callable[[], set[tuple[str, str]]], label: str = "SQLite") -> None:
    """4 threads stream RecordEvents at a server process; SIGKILL once 400 events were acknowledged; every
    acknowledged (user, item) must be ``present()`` in the store, and a restarted server personalises from it."""
    proc = server_process(artifact, "--events-db", events_db).wait_serving()
    with Client(proc.target) as c:
        item_ids = [h.item_id for h in c.search("organic", 20)]
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w: int) -> None:
        with Client(proc.target, timeout=5) as c:
            n = 0
            while not stop.is_set():
                batch = [ev(f"w{w}-b{n}", item_ids[(n + i) % len(item_ids)]) for i in range(5)]
                try:
                    c.record_events(batch)
                except BundleRecError:
                    return  # the server died under us: this batch was not acknowledged
                with lock:
                    acked.extend((e.user_id, e.item_id) for e in batch)
                n += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while True:  # kill once a good number of batches went through
        with lock:
            if len(acked) >= 400 or time.monotonic() > deadline:
                break
        time.sleep(0.01)
    proc.signal(signal.SIGKILL)
    proc.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    restarted = server_process(artifact, "--events-db", events_db).wait_serving()
    try:
        rows = present()
        missing = [a for a in acked if a not in rows]
        print(f"SIGKILL durability ({label}): {len(acked)} acknowledged, {len(acked) - len(missing)} recovered, {len(rows)} rows")
        assert len(acked) >= 400 and not missing, f"{len(missing)} of {len(acked)} acknowledged events lost"
        with Client(restarted.target) as c:  # and the restarted server personalizes from them
            s = c.recommend("snacks", user_id="w0-b0")
            list(s)
            assert s.summary.personalized
    finally:
        restarted.stop()


def test_opening_a_file_another_process_is_switching_to_wal_retries(tmp_path, monkeypatch):
    """Workers sharing one SQLite file open it at the same moment; while one switches it to WAL the others find it
    locked without SQLite waiting (seen as a worker exiting at start). The open retries that; other errors are not
    retried."""
    import bundlerec_server.events as ev

    real_connect, calls = sqlite3.connect, []

    class LockedOnce:
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            raise sqlite3.OperationalError("database is locked")

        def close(self):
            self.conn.close()

    def connect(*args, **kwargs):
        calls.append(args[0])
        conn = real_connect(*args, **kwargs)
        return LockedOnce(conn) if len(calls) == 1 else conn

    monkeypatch.setattr(ev.sqlite3, "connect", connect)
    store = ev.SqliteEventStore(tmp_path / "ev.sqlite3")
    conn = store._connect()
    assert len(calls) == 2 and conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(ev.sqlite3, "connect", broken)
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        ev.SqliteEventStore(tmp_path / "other.sqlite3")._connect()
