"""The PostgreSQL event store against a real PostgreSQL: replicas share it (100 of 100), SIGKILL loses no
acknowledged event, a database restart gives callers UNAVAILABLE and the service recovers by itself; and
``--events-db`` values with an unknown scheme are refused at start."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import pytest
from conftest import server_process
from test_events import ev, sigkill_mid_stream

from bundlerec import Client
from bundlerec.errors import from_rpc_error
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc
from bundlerec_server.events import EventRecord, EventStoreError, open_event_store, parse_events_db
from bundlerec_server.settings import Settings


# --- --events-db values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "kind", "target"), [
    ("postgresql://bundlerec@db.internal:5432/events", "postgresql", "postgresql://bundlerec@db.internal:5432/events"),
    ("postgres://u:pw@127.0.0.1/db", "postgresql", "postgres://u:pw@127.0.0.1/db"),
    ("sqlite:///var/lib/bundlerec/events.sqlite3", "sqlite", "/var/lib/bundlerec/events.sqlite3"),
    ("data/events.sqlite3", "sqlite", "data/events.sqlite3"),
    ("./odd:name.sqlite3", "sqlite", "./odd:name.sqlite3"),
])
def test_events_db_forms(value, kind, target):
    db = parse_events_db(value)
    assert (db.kind, db.target) == (kind, target)
    assert Settings.load(["--events-db", value], env={}).events_db == value  # a URL stays a URL (not a Path)


@pytest.mark.parametrize("value", ["mysql://root@127.0.0.1:3306/events", "redis://127.0.0.1:6379/0", "http://example.com/x",
                                   "postgresql:/u@h/db"])
def test_unknown_scheme_is_refused_at_start(value, tiny_artifact, tmp_path):
    with pytest.raises(ValueError, match="events_db"):
        Settings.load([], env={"BUNDLEREC_EVENTS_DB": value})
    done = subprocess.run(
        [sys.executable, "-m", "bundlerec_server", "--artifact", str(tiny_artifact), "--port", "0", "--events-db", value],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    print(f"--events-db {value}: exit {done.returncode}: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    assert "events_db" in done.stderr and ("not supported" in done.stderr or "malformed" in done.stderr)
    assert list(tmp_path.iterdir()) == []  # no folder named 'mysql:' (or anything else) was created


# --- the store itself ---------------------------------------------------------------------------------------
def test_store_roundtrip_and_idempotent_schema(pg_dsn):
    async def main() -> tuple[list[str], list[str], int]:
        first = open_event_store(pg_dsn, recent_per_user=3)
        await first.start()
        await first.append([EventRecord("u1", f"i{k % 5}", 1, 1000 + k) for k in range(10)])
        second = open_event_store(pg_dsn, recent_per_user=3)  # a second replica: the schema exists already
        await second.start()
        try:
            return await second.recent_items("u1"), await second.recent_items("nobody"), await second.count()
        finally:
            await first.close()
            await second.close()

    recent, unknown, rows = asyncio.run(main())
    assert recent == ["i4", "i3", "i2"]  # newest first, distinct, at most recent_per_user
    assert unknown == [] and rows == 10


def test_unreachable_database_at_start_is_a_clear_error(postgres):
    from conftest import free_port

    async def main() -> None:
        store = open_event_store(f"postgresql://bundlerec:secret@127.0.0.1:{free_port()}/events")
        store.start_timeout_s = 1.0  # type: ignore[attr-defined]
        await store.start()

    with pytest.raises(EventStoreError, match="cannot open the PostgreSQL event store") as info:
        asyncio.run(main())
    assert "secret" not in str(info.value)  # the password never reaches logs


# --- replicas, crashes, restarts --------------------------------------------------------------------------
def test_event_on_replica_a_personalizes_replica_b(tiny_artifact, pg_dsn):
    """Two server processes share one PostgreSQL: 100 times, an event recorded through A personalises the
    very next Recommend served by B (which never saw the RecordEvents call and keeps no copy)."""
    replicas = [server_process(tiny_artifact, "--events-db", pg_dsn) for _ in range(2)]  # start together: schema race
    try:
        a, b = (r.wait_serving() for r in replicas)
        with Client(a.target) as ca, Client(b.target) as cb:
            items = [h.item_id for h in ca.search("organic", 20)]
            hits = 0
            for trial in range(100):
                user = f"trial-{trial}"
                before = cb.recommend("snacks", user_id=user)
                list(before)
                assert ca.record_events([ev(user, items[trial % len(items)])]).accepted == 1
                after = cb.recommend("snacks", user_id=user)
                list(after)
                hits += (not before.summary.personalized) and after.summary.personalized
        print(f"replica A -> replica B personalization: {hits} of 100 trials")
        assert hits == 100
    finally:
        for r in replicas:
            r.stop()


def test_acknowledged_events_survive_sigkill(tiny_artifact, pg_dsn):
    import psycopg

    def present() -> set[tuple[str, str]]:
        with psycopg.connect(pg_dsn) as conn:
            return set(conn.execute("SELECT user_id, item_id FROM bundlerec_events").fetchall())

    sigkill_mid_stream(tiny_artifact, pg_dsn, present, label="PostgreSQL")


class Callers:
    """Threads alternating RecordEvents and Recommend (with a user id) on plain gRPC stubs (no client-side
    retries) until stopped; records (time, method, status code, retry hint) for every call."""

    def __init__(self, target: str, items: list[str], threads: int = 3) -> None:
        self.target, self.items = target, items
        self.calls: list[tuple[float, str, str, float | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, t: int) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = pb_grpc.BundleRecommenderStub(ch)
            n = 0
            while not self._stop.is_set():
                user = f"restart-{t}-{n % 10}"
                for method in ("RecordEvents", "Recommend"):
                    code, hint = "OK", None
                    try:
                        if method == "RecordEvents":
                            stub.RecordEvents(iter([ev(user, self.items[n % len(self.items)])]), timeout=10)
                        else:
                            list(stub.Recommend(pb.RecommendRequest(query="snacks", user_id=user), timeout=10))
                    except grpc.RpcError as err:
                        code, hint = err.code().name, from_rpc_error(err).retry_after_s
                    with self._lock:
                        self.calls.append((time.monotonic(), method, code, hint))
                n += 1

    def ok_since(self, t0: float) -> Counter:
        with self._lock:
            return Counter(m for t, m, c, _ in self.calls if t >= t0 and c == "OK")

    def wait(self, t0: float, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ok = self.ok_since(t0)
            if ok["RecordEvents"] >= n and ok["Recommend"] >= n:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> Callers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_database_restart_gives_unavailable_then_recovers(tiny_artifact, restartable_postgres):
    """Under a bounded load loop the database goes away for a few seconds and comes back: calls made
    meanwhile fail with UNAVAILABLE and a retry hint (never INTERNAL/UNKNOWN), and later calls succeed
    without any restart of the server (the pool reconnects by itself)."""
    dsn = restartable_postgres.database()
    proc = server_process(tiny_artifact, "--events-db", dsn).wait_serving()
    try:
        with Client(proc.target) as c:
            items = [h.item_id for h in c.search("organic", 10)]
        with Callers(proc.target, items) as load:
            assert load.wait(0.0, 20, timeout=60), "no steady load before the restart"
            down = time.monotonic()
            restartable_postgres.stop()
            try:
                time.sleep(4.0)  # calls keep coming while the database is down
            finally:
                restartable_postgres.start()
            up = time.monotonic()
            recovered = load.wait(up, 20, timeout=60)
        during = Counter((m, c) for t, m, c, _ in load.calls if down <= t)
        codes = Counter(c for _, _, c, _ in load.calls)
        first_ok = {m: min((t for t, mm, c, _ in load.calls if mm == m and c == "OK" and t >= up), default=None)
                    for m in ("RecordEvents", "Recommend")}
        hints = {h for _, _, c, h in load.calls if c == "UNAVAILABLE"}
        print(f"database restart under load: {len(load.calls)} calls, codes {dict(codes)}; from the stop on {dict(during)}; "
              "first success after the start: " + ", ".join(f"{m} +{t - up:.2f} s" for m, t in first_ok.items() if t is not None)
              + f"; retry hints {sorted(h for h in hints if h is not None)}")
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes  # never INTERNAL or UNKNOWN
        assert during[("RecordEvents", "UNAVAILABLE")] > 0 and during[("Recommend", "UNAVAILABLE")] > 0
        assert hints == {1.0}  # every UNAVAILABLE carries RetryInfo
        assert recovered, f"calls did not succeed again after the database came back: {dict(load.ok_since(up))}"
        with Client(proc.target) as c:  # events recorded after the restart personalise again
            assert c.record_events([ev("after-restart", items[0])]).accepted == 1
            s = c.recommend("snacks", user_id="after-restart")
            list(s)
            assert s.summary.personalized
    finally:
        proc.stop()
