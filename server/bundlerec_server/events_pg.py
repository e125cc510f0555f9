"""The shared event store on PostgreSQL (psycopg 3, an async connection pool): replicas on several machines
record into and read from one database.

Durability: each RecordEvents call is one transaction with ``synchronous_commit=on`` (set on every
connection, whatever the server's default): COMMIT returns only once the commit record is flushed to the
WAL on disk (and to synchronous standbys, where configured), and the call is acknowledged only after that.
A COMMIT interrupted by a lost connection has an unknown outcome: the call fails (UNAVAILABLE, not
acknowledged) and a retry may store its events a second time.

Freshness: there is no local copy. Every Recommend with a user id reads that user's history from the
database (recent items: one index scan of the newest rows; purchase counts: an aggregate over the newest
``COUNT_SCAN`` purchase events through a partial index), so an event acknowledged by any replica
personalises the next call on every replica.

Outages: a database that is down, restarting or too slow makes the call fail with UNAVAILABLE and a
RetryInfo hint (:class:`~.events.StoreUnavailable`), for RecordEvents and for the history read of
Recommend alike. The pool checks a connection before lending it when it may be stale (idle a while, or
older than the last failure) and replaces broken ones in the background, so the service recovers by
itself once the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence

import psycopg
from psycopg_pool import AsyncConnectionPool

from .bundling import COUNT_HALF_LIFE_DAYS
from .domain import History, ItemCount
from .events import COUNT_SCAN, PURCHASE, EventRecord, EventStoreError, StoreUnavailable, top_counts

logger = logging.getLogger(__name__)

TABLE = "bundlerec_events"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    type SMALLINT NOT NULL,
    ts_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS {TABLE}_user_recent ON {TABLE} (user_id, ts_ms DESC, id DESC) INCLUDE (item_id);
CREATE INDEX IF NOT EXISTS {TABLE}_user_purchases ON {TABLE} (user_id, ts_ms DESC, id DESC) INCLUDE (item_id)
    WHERE type = {PURCHASE};
"""
SCHEMA_LOCK = 0x62756E646C6572  # advisory lock: replicas starting together create the schema one at a time
INSERT = f"""
INSERT INTO {TABLE} (user_id, item_id, type, ts_ms, received_ms)
SELECT u, i, t, ts, %s FROM unnest(%s::text[], %s::text[], %s::smallint[], %s::bigint[]) AS e(u, i, t, ts)
"""
RECENT = f"SELECT item_id FROM {TABLE} WHERE user_id = %s ORDER BY ts_ms DESC, id DESC LIMIT %s"
COUNTS = f"""
SELECT item_id, count(*), min(ts_ms), max(ts_ms) FROM (
    SELECT item_id, ts_ms FROM {TABLE} WHERE user_id = %s AND type = {PURCHASE} ORDER BY ts_ms DESC, id DESC LIMIT %s
) AS e GROUP BY item_id
"""


def redact(dsn: str) -> str:
    """The URL without its password (for logs and messages)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", dsn)


class _Connection(psycopg.AsyncConnection):
    last_ok = 0.0  # when an operation on it last succeeded (monotonic)


class PgEventStore:
    shared = True  # always: reads go to the database, never to a local copy

    def __init__(
        self, dsn: str, recent_per_user: int = 20, *, min_size: int = 2, max_size: int = 10,
        acquire_timeout_s: float = 2.0, op_timeout_s: float = 5.0, start_timeout_s: float = 30.0,
        retry_after_s: float = 1.0, scan_factor: int = 4, check_idle_s: float = 5.0,
        counts_per_user: int = 200, half_life_days: float = COUNT_HALF_LIFE_DAYS,
    ) -> None:
        self.dsn = dsn
        self.recent_per_user = recent_per_user
        self.counts_per_user = counts_per_user
        self.half_life_days = half_life_days
        self.scan = recent_per_user * scan_factor  # newest rows read per history: repeats collapse into fewer items
        self.op_timeout_s = op_timeout_s
        self.start_timeout_s = start_timeout_s
        self.retry_after_s = retry_after_s
        self.check_idle_s = check_idle_s
        self._down_since: float | None = None
        self._failed_at = 0.0  # when an operation last failed for want of the database
        self._pool = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, timeout=acquire_timeout_s, name="bundlerec-events",
            connection_class=_Connection, check=self._check,
            kwargs={
                "autocommit": True, "connect_timeout": 3, "application_name": "bundlerec",
                "options": f"-c synchronous_commit=on -c statement_timeout={int(op_timeout_s * 1000)}",
            },
        )

    async def _check(self, conn: _Connection) -> None:
        """Before lending a connection: a round trip to prove it alive, unless it served an operation in the
        last ``check_idle_s`` and nothing failed since (a check on every call would double the reads' cost).
        After a database restart the first failure makes every older connection checked, so broken ones
        are replaced rather than lent."""
        if conn.last_ok < max(self._failed_at, time.monotonic() - self.check_idle_s):
            await AsyncConnectionPool.check_connection(conn)

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[_Connection]:
        """A pooled connection for one operation, bounded by ``op_timeout_s``; an unreachable or failing
        database becomes StoreUnavailable (UNAVAILABLE for the caller). Other errors are bugs and pass."""
        try:
            async with asyncio.timeout(self.op_timeout_s), self._pool.connection() as conn:
                yield conn
                conn.last_ok = time.monotonic()
        except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:  # PoolTimeout included
            self._failed_at = time.monotonic()
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning("event store unreachable (%s: %s): calls get UNAVAILABLE until it is back", what, type(exc).__name__)
            raise StoreUnavailable(
                "the event store is unavailable (database unreachable or restarting); retry shortly", self.retry_after_s
            ) from exc
        if self._down_since is not None:
            logger.warning("event store reachable again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    async def start(self) -> None:
        """Opens the pool (waiting up to ``start_timeout_s`` for the database) and creates the schema."""
        try:
            await self._pool.open(wait=True, timeout=self.start_timeout_s)
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                await conn.execute(SCHEMA)
                sync = await (await conn.execute("SHOW synchronous_commit")).fetchone()
        except psycopg.Error as exc:
            await self._pool.close()
            raise EventStoreError(f"cannot open the PostgreSQL event store {redact(self.dsn)} (is it running and reachable?): {exc}") from exc
        logger.info("event store %s: table %s (synchronous_commit=%s, pool %d-%d)", redact(self.dsn), TABLE,
                    sync[0] if sync else "?", self._pool.min_size, self._pool.max_size)

    async def append(self, events: Sequence[EventRecord]) -> None:
        """Stores ``events`` in one transaction; returns only after COMMIT returned (durable)."""
        if not events:
            return
        now = int(time.time() * 1000)
        columns = ([e.user_id for e in events], [e.item_id for e in events], [e.type for e in events], [e.ts_ms for e in events])
        async with self._connection("append") as conn, conn.transaction():
            await conn.execute(INSERT, (now, *columns))

    async def recent_items(self, user_id: str) -> list[str]:
        """The user's most recent distinct item ids, newest first, read from the database on every call."""
        async with self._connection("history") as conn:
            rows = await (await conn.execute(RECENT, (user_id, self.scan))).fetchall()
        return list(dict.fromkeys(r[0] for r in rows))[: self.recent_per_user]

    async def history(self, user_id: str) -> History:
        """Recent distinct items (newest first) and the top ``counts_per_user`` purchase counts of the user,
        read from the database on every call (two statements on one connection)."""
        async with self._connection("history") as conn:
            rows = await (await conn.execute(RECENT, (user_id, self.scan))).fetchall()
            agg = []
            if self.counts_per_user > 0:
                agg = await (await conn.execute(COUNTS, (user_id, COUNT_SCAN))).fetchall()
        counts = top_counts((ItemCount(r[0], int(r[1]), int(r[2]), int(r[3])) for r in agg), self.counts_per_user,
                            int(time.time() * 1000), self.half_life_days)
        return History(recent=tuple(dict.fromkeys(r[0] for r in rows))[: self.recent_per_user], counts=counts)

    async def count(self) -> int:
        async with self._connection("count") as conn:
            row = await (await conn.execute(f"SELECT count(*) FROM {TABLE}")).fetchone()
        return row[0] if row else 0

    async def close(self) -> None:
        await self._pool.close()
