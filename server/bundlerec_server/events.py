"""Durable shopper events and the per-user recent items that personalise Recommend.

``--events-db`` picks the store (:func:`open_event_store`): a path or ``sqlite:///path`` is the embedded
SQLite store below (one machine); ``postgresql://`` / ``postgres://`` is the shared PostgreSQL store of
:mod:`.events_pg` (replicas on several machines); any other scheme is refused at start
(:func:`parse_events_db`). Both acknowledge a RecordEvents call only after its COMMIT returned.

SQLite durability policy: ``journal_mode=WAL`` with ``synchronous=FULL``: a transaction's WAL frames are fsynced
before COMMIT returns, and RecordEvents acknowledges only after its COMMIT returned. An acknowledged event
therefore survives a crash of the process (SIGKILL) and of the machine. One RecordEvents call is one
transaction: all of its events are stored, or none.

All SQLite work runs on one dedicated writer thread (SQLite connections are not shared across threads);
the request path never touches the database: it reads an in-memory, bounded LRU of each user's most
recent item ids and per-item purchase counts, filled from the database at start and updated after each commit.

A user's :class:`~.domain.History` is their most recent distinct items (any event type, newest first) and,
from PURCHASE events only, per-item counts with the first and last purchase time: the ``counts_per_user``
items with the largest recency-decayed count (:func:`~.bundling.decayed_count`, ``half_life_days``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from .bundling import COUNT_HALF_LIFE_DAYS, decayed_count
from .domain import History, ItemCount
from .errors import NotReady

if TYPE_CHECKING:
    import os

    from google.protobuf import any_pb2

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    type INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts_ms DESC, id DESC);
"""
PURCHASE = 4  # bundlerec.v1.EventType.EVENT_TYPE_PURCHASE: the events that count as purchases
OPEN_RETRY_S = 10.0  # how long opening the SQLite file retries while another process holds it (see _connect)
COUNT_SCAN = 5000  # newest purchase events of a user aggregated into counts when read from the database


def top_counts(counts: Iterable[ItemCount], n: int, now_ms: int, half_life_days: float) -> tuple[ItemCount, ...]:
    """The ``n`` items with the largest decayed count, largest first (ties: newest purchase, then id)."""
    scored = sorted(counts, key=lambda c: (-decayed_count(c.count, c.first_ms, c.last_ms, now_ms, half_life_days),
                                           -(c.last_ms or 0), c.item_id))
    return tuple(scored[:n])


@dataclass(frozen=True)
class EventRecord:
    user_id: str
    item_id: str
    type: int
    ts_ms: int


class StoreUnavailable(NotReady):
    """The event store cannot be reached (database down, restarting, or too slow): UNAVAILABLE with a
    RetryInfo hint. Never INTERNAL: it is an outage to ride out, not a bug."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)

    def details(self) -> list[any_pb2.Any]:
        return super().details()  # the RetryInfo detail (and the pushback trailer: errors.to_status)


class EventStoreError(Exception):
    """The event store could not be opened at start (the server then refuses to start)."""


class EventStore(Protocol):
    shared: bool

    async def start(self) -> None: ...

    async def append(self, events: Sequence[EventRecord]) -> None: ...

    async def recent_items(self, user_id: str) -> list[str]: ...

    async def history(self, user_id: str) -> History: ...

    async def close(self) -> None: ...


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite://"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: not a drive letter


@dataclass(frozen=True)
class EventsDb:
    kind: Literal["sqlite", "postgresql"]
    target: str  # the SQLite path, or the PostgreSQL connection URL


def parse_events_db(value: str | os.PathLike[str]) -> EventsDb:
    """Which store ``--events-db`` names. ValueError (with the accepted forms) for any other scheme:
    ``mysql://...`` must not become a SQLite file in a folder named ``mysql:``."""
    text = str(value)
    if text.startswith(POSTGRES_SCHEMES):
        return EventsDb("postgresql", text)
    if text.startswith(SQLITE_SCHEME):
        path = text[len(SQLITE_SCHEME):]
        if not path:
            raise ValueError(f"events_db {text!r}: sqlite:// needs a path (sqlite:///var/lib/bundlerec/events.sqlite3)")
        return EventsDb("sqlite", path)
    match = _SCHEME.match(text)
    if match and match.group(1).lower() in ("postgresql", "postgres", "sqlite"):
        raise ValueError(f"events_db: malformed {match.group(1)} URL: write postgresql://user@host:port/db or sqlite:///path")
    if match:
        raise ValueError(
            f"events_db scheme {match.group(1)!r} is not supported: use postgresql://user@host:port/db (or postgres://), "
            "sqlite:///path or a plain file path (write ./name for a relative path containing ':')")
    return EventsDb("sqlite", text)


def open_event_store(value: str | os.PathLike[str], recent_per_user: int = 20, shared: bool = False,
                     counts_per_user: int = 200, half_life_days: float = COUNT_HALF_LIFE_DAYS) -> EventStore:
    """The store ``value`` names (not started). PostgreSQL is always shared: every read goes to the database."""
    db = parse_events_db(value)
    if db.kind == "postgresql":
        from .events_pg import PgEventStore  # psycopg is imported only when PostgreSQL is configured

        return PgEventStore(db.target, recent_per_user=recent_per_user, counts_per_user=counts_per_user,
                            half_life_days=half_life_days)
    return SqliteEventStore(Path(db.target), recent_per_user=recent_per_user, shared=shared,
                            counts_per_user=counts_per_user, half_life_days=half_life_days)


def _now_ms() -> int:
    return int(time.time() * 1000)


class SqliteEventStore:
    def __init__(self, path: Path, recent_per_user: int = 20, max_users: int = 100_000, shared: bool = False,
                 counts_per_user: int = 200, half_life_days: float = COUNT_HALF_LIFE_DAYS) -> None:
        self.path = Path(path)
        self.shared = shared
        self._local = threading.local()
        self.recent_per_user = recent_per_user
        self.counts_per_user = counts_per_user
        self.half_life_days = half_life_days
        self.max_users = max_users
        self._recent: OrderedDict[str, deque[str]] = OrderedDict()
        # user -> item -> [purchases, first ms, last ms]; at most 2 x counts_per_user items (pruned by decayed count)
        self._counts: OrderedDict[str, dict[str, list[int]]] = OrderedDict()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        self._conn: sqlite3.Connection | None = None

    # --- writer thread -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """The WAL connection with the schema. Processes sharing the file (``--workers N``) that open it at the same
        moment can find it locked while one of them switches it to WAL (SQLite does not wait on that lock), so the
        open is retried for up to :data:`OPEN_RETRY_S`."""
        deadline = time.monotonic() + OPEN_RETRY_S
        while True:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(SCHEMA)
                return conn
            except sqlite3.OperationalError as exc:
                conn.close()
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                logger.info("event store %s is locked by another process opening it; retrying", self.path)
                time.sleep(0.05)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        self._conn = conn
        rows = conn.execute(
            "SELECT user_id, item_id FROM (SELECT user_id, item_id, ts_ms, id, ROW_NUMBER() OVER "
            "(PARTITION BY user_id ORDER BY ts_ms DESC, id DESC) AS r FROM events) WHERE r <= ? "
            "ORDER BY ts_ms ASC, id ASC",
            (self.recent_per_user,),
        ).fetchall()
        for user_id, item_id in rows:
            self._remember(user_id, item_id)
        if self.counts_per_user > 0:
            for user_id, item_id, n, first, last in conn.execute(
                    "SELECT user_id, item_id, COUNT(*), MIN(ts_ms), MAX(ts_ms) FROM events WHERE type = ? "
                    "GROUP BY user_id, item_id ORDER BY MAX(ts_ms) ASC", (PURCHASE,)):
                self._count(user_id, item_id, n, first, last)
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def _insert(self, events: Sequence[EventRecord]) -> None:
        now = int(time.time() * 1000)
        conn = self._conn
        if conn is None:
            raise RuntimeError("the event store is not started")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO events (user_id, item_id, type, ts_ms, received_ms) VALUES (?, ?, ?, ?, ?)",
                [(e.user_id, e.item_id, e.type, e.ts_ms, now) for e in events],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _remember(self, user_id: str, item_id: str) -> None:
        recent = self._recent.get(user_id)
        if recent is None:
            recent = self._recent[user_id] = deque(maxlen=self.recent_per_user)
            while len(self._recent) > self.max_users:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(user_id)
            if item_id in recent:
                recent.remove(item_id)
        recent.append(item_id)

    def _count(self, user_id: str, item_id: str, n: int, first_ms: int, last_ms: int) -> None:
        counts = self._counts.get(user_id)
        if counts is None:
            counts = self._counts[user_id] = {}
            while len(self._counts) > self.max_users:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(user_id)
        entry = counts.get(item_id)
        if entry is None:
            counts[item_id] = [n, first_ms, last_ms]
        else:
            entry[0] += n
            entry[1], entry[2] = min(entry[1], first_ms), max(entry[2], last_ms)
        if len(counts) > 2 * self.counts_per_user:  # keep memory bounded: drop the weakest half
            keep = top_counts(self._entries(counts), self.counts_per_user, _now_ms(), self.half_life_days)
            self._counts[user_id] = {c.item_id: counts[c.item_id] for c in keep}

    @staticmethod
    def _entries(counts: dict[str, list[int]]) -> list[ItemCount]:
        return [ItemCount(item, n, first, last) for item, (n, first, last) in counts.items()]

    # --- async API -----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        count = await loop.run_in_executor(self._writer, self._open)
        logger.info("event store %s: %d events, %d users in memory (WAL, synchronous=FULL)", self.path, count, len(self._recent))

    async def append(self, events: Sequence[EventRecord]) -> None:
        """Stores ``events`` in one durable transaction; returns only after COMMIT (then feeds personalisation)."""
        if not events:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._insert, events)
        for e in sorted(events, key=lambda e: e.ts_ms):
            self._remember(e.user_id, e.item_id)
            if e.type == PURCHASE and self.counts_per_user > 0:
                self._count(e.user_id, e.item_id, 1, e.ts_ms, e.ts_ms)

    async def recent_items(self, user_id: str) -> list[str]:
        """The user's most recent distinct item ids, newest first (empty for an unknown user).

        Single process: from memory. Several workers on one file (``shared``): from SQLite, so an event
        recorded through one worker personalises calls served by any other."""
        if self.shared:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._read_recent, user_id)
        recent = self._recent.get(user_id)
        return list(reversed(recent)) if recent else []

    async def history(self, user_id: str) -> History:
        """Recent distinct items (newest first) and the top ``counts_per_user`` purchase counts of the user
        (empty for an unknown user); from memory, or from SQLite when ``shared``."""
        if self.shared:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._read_history, user_id)
        recent = self._recent.get(user_id)
        counts = self._counts.get(user_id)
        return History(
            recent=tuple(reversed(recent)) if recent else (),
            counts=top_counts(self._entries(counts), self.counts_per_user, _now_ms(), self.half_life_days) if counts else (),
        )

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return conn

    def _read_history(self, user_id: str) -> History:
        counts: tuple[ItemCount, ...] = ()
        if self.counts_per_user > 0:
            rows = self._reader().execute(
                "SELECT item_id, COUNT(*), MIN(ts_ms), MAX(ts_ms) FROM (SELECT item_id, ts_ms FROM events "
                "WHERE user_id = ? AND type = ? ORDER BY ts_ms DESC, id DESC LIMIT ?) GROUP BY item_id",
                (user_id, PURCHASE, COUNT_SCAN),
            ).fetchall()
            counts = top_counts((ItemCount(*r) for r in rows), self.counts_per_user, _now_ms(), self.half_life_days)
        return History(recent=tuple(self._read_recent(user_id)), counts=counts)

    def _read_recent(self, user_id: str) -> list[str]:
        conn = self._reader()
        rows = conn.execute(
            "SELECT item_id FROM events WHERE user_id = ? GROUP BY item_id ORDER BY MAX(ts_ms) DESC, MAX(id) DESC LIMIT ?",
            (user_id, self.recent_per_user),
        ).fetchall()
        return [r[0] for r in rows]

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, _close)
        self._writer.shutdown(wait=True)
