"""Counts-carrying shopper history: recency-decayed purchase counts (hand-computed), the ``recent_item_counts``
request field (validation, INVALID_ARGUMENT details), per-item counts from both event stores (SQLite, and
PostgreSQL through the ``pg_dsn`` fixture), and served Recommend complements that follow the counts."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from conftest import ServerThread, server_settings

from bundlerec import BundleRecError, Client, item_count
from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec_server.artifact import ItemTable
from bundlerec_server.bundling import DAY_MS, PERSONAL_REASON, count_affinity, decayed_count
from bundlerec_server.convert import recommend_query
from bundlerec_server.domain import ItemCount
from bundlerec_server.errors import InvalidRequest
from bundlerec_server.events import PURCHASE, EventRecord, SqliteEventStore, open_event_store, top_counts
from bundlerec_server.settings import Settings

NOW = 1_800_000_000_000  # a fixed "now" in ms
S = Settings()


# --- the decayed count -----------------------------------------------------------------------------------
def test_decayed_count_by_hand():
    assert decayed_count(3, None, None, NOW, 45.0) == 3.0  # no time: the plain count
    assert decayed_count(3, None, NOW - 10 * DAY_MS, NOW, 0.0) == 3.0  # half-life off
    assert decayed_count(2, None, NOW - 10 * DAY_MS, NOW, 10.0) == pytest.approx(1.0)  # both at the last time
    # three purchases 0, 10 and 20 days ago, half-life 10 days: 1 + 1/2 + 1/4
    assert decayed_count(3, NOW - 20 * DAY_MS, NOW, NOW, 10.0) == pytest.approx(1.75)
    # 5 and 15 days ago: (1 + 1/2) x 2 ** -0.5
    assert decayed_count(2, NOW - 15 * DAY_MS, NOW - 5 * DAY_MS, NOW, 10.0) == pytest.approx(1.5 / math.sqrt(2))
    assert decayed_count(4, None, NOW + DAY_MS, NOW, 10.0) == 4.0  # a future time counts as now
    assert decayed_count(4, NOW - 30 * DAY_MS, NOW, NOW, 45.0) < 4.0  # older purchases weigh less


def test_count_affinity_scales_by_the_largest_and_keeps_the_max_per_row():
    aff = count_affinity([(1, 4.0), (2, 1.0), (1, 2.0), (3, 0.0)])
    assert aff == {1: 1.0, 2: 0.25}
    assert count_affinity([]) == {}


def test_top_counts_orders_by_decayed_count():
    counts = [ItemCount("old", 10, NOW - 400 * DAY_MS, NOW - 300 * DAY_MS), ItemCount("new", 2, NOW - DAY_MS, NOW),
              ItemCount("one", 1, None, None)]
    assert [c.item_id for c in top_counts(counts, 2, NOW, 45.0)] == ["new", "one"]  # 10 purchases a year ago weigh little
    assert [c.item_id for c in top_counts(counts, 3, NOW, 0.0)] == ["old", "new", "one"]  # plain counts


# --- validation ----------------------------------------------------------------------------------------------
def _ts(ms: int):
    from google.protobuf import timestamp_pb2

    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def test_recent_item_counts_are_parsed():
    req = pb.RecommendRequest(query="milk", recent_item_counts=[
        pb.ItemCount(item_id="a", count=3, last_seen=_ts(NOW - 1000), first_seen=_ts(NOW - 9000)),
        pb.ItemCount(item_id="b", count=1)])
    q = recommend_query(req, S, now_ms=NOW)
    assert q.recent_item_counts == (ItemCount("a", 3, NOW - 9000, NOW - 1000), ItemCount("b", 1, None, None))


def test_bad_recent_item_counts_are_all_reported():
    req = pb.RecommendRequest(query="milk", recent_item_counts=[
        pb.ItemCount(item_id="a", count=0),
        pb.ItemCount(item_id="a", count=2),
        pb.ItemCount(item_id=" b", count=2_000_000),
        pb.ItemCount(item_id="c", count=1, first_seen=_ts(NOW)),
        pb.ItemCount(item_id="d", count=1, last_seen=_ts(NOW), first_seen=_ts(NOW + 1000)),
        pb.ItemCount(item_id="e", count=1, last_seen=_ts(NOW + 2 * DAY_MS)),
    ])
    with pytest.raises(InvalidRequest) as info:
        recommend_query(req, S, now_ms=NOW)
    fields = [v.field for v in info.value.violations]
    assert fields == ["recent_item_counts[0].count", "recent_item_counts[1].item_id", "recent_item_counts[2].item_id",
                      "recent_item_counts[2].count", "recent_item_counts[3].first_seen",
                      "recent_item_counts[4].first_seen", "recent_item_counts[5].last_seen"]
    too_many = pb.RecommendRequest(query="milk", recent_item_counts=[pb.ItemCount(item_id=str(i), count=1) for i in range(201)])
    with pytest.raises(InvalidRequest) as info:
        recommend_query(too_many, S, now_ms=NOW)
    assert [v.field for v in info.value.violations] == ["recent_item_counts"]


def test_invalid_counts_are_invalid_argument_with_field_details(client):
    with pytest.raises(BundleRecError) as info:
        list(client.recommend("milk", recent_item_counts=[pb.ItemCount(item_id="196", count=0)]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in info.value.field_violations] == ["recent_item_counts[0].count"]


# --- the stores ------------------------------------------------------------------------------------------------
def _events(now_ms: int) -> list[EventRecord]:
    day = DAY_MS
    return [
        EventRecord("u1", "milk", PURCHASE, now_ms - 20 * day), EventRecord("u1", "milk", PURCHASE, now_ms - 10 * day),
        EventRecord("u1", "milk", PURCHASE, now_ms - day), EventRecord("u1", "eggs", PURCHASE, now_ms - 2 * day),
        EventRecord("u1", "tv", 1, now_ms), EventRecord("u1", "tv", 1, now_ms - 5),  # views are not purchases
        EventRecord("u2", "eggs", PURCHASE, now_ms - day),
    ]


def _check_history(hist, now_ms: int) -> None:
    assert hist.recent[:3] == ("tv", "milk", "eggs")
    assert [(c.item_id, c.count) for c in hist.counts] == [("milk", 3), ("eggs", 1)]
    milk = hist.counts[0]
    assert (milk.first_ms, milk.last_ms) == (now_ms - 20 * DAY_MS, now_ms - DAY_MS)


@pytest.mark.parametrize("shared", [False, True])
def test_sqlite_store_counts_purchases(tmp_path, shared):
    now = int(time.time() * 1000)

    async def main():
        store = SqliteEventStore(tmp_path / "e.sqlite3", shared=shared)
        await store.start()
        await store.append(_events(now))
        hist, nobody = await store.history("u1"), await store.history("nobody")
        await store.close()
        reopened = SqliteEventStore(tmp_path / "e.sqlite3", counts_per_user=1)  # counts are rebuilt at start
        await reopened.start()
        again = await reopened.history("u1")
        await reopened.close()
        return hist, nobody, again

    hist, nobody, again = asyncio.run(main())
    _check_history(hist, now)
    assert nobody.recent == () and nobody.counts == ()
    assert [(c.item_id, c.count) for c in again.counts] == [("milk", 3)]  # bounded to counts_per_user


def test_sqlite_memory_stays_bounded_per_user(tmp_path):
    now = int(time.time() * 1000)

    async def main():
        store = SqliteEventStore(tmp_path / "e.sqlite3", counts_per_user=5)
        await store.start()
        await store.append([EventRecord("u", f"i{k}", PURCHASE, now - k) for k in range(40)]
                           + [EventRecord("u", "i39", PURCHASE, now - 100 - k) for k in range(5)])
        hist = await store.history("u")
        size = len(store._counts["u"])
        await store.close()
        return hist, size

    hist, size = asyncio.run(main())
    assert size <= 10 and len(hist.counts) == 5
    assert hist.counts[0].item_id == "i39" and hist.counts[0].count == 6  # the most bought survives pruning


def test_postgres_store_counts_purchases(pg_dsn):
    now = int(time.time() * 1000)

    async def main():
        store = open_event_store(pg_dsn)
        await store.start()
        try:
            await store.append(_events(now))
            return await store.history("u1"), await store.history("nobody")
        finally:
            await store.close()

    hist, nobody = asyncio.run(main())
    _check_history(hist, now)
    assert nobody.recent == () and nobody.counts == ()


# --- served --------------------------------------------------------------------------------------------------------
def _anchor_and_two_others(client, items: ItemTable) -> tuple[str, str, str, str]:
    """A served anchor for "soda", and two items of other aisles than it (and than each other)."""
    bundles = list(client.recommend("soda", max_bundles=1, max_items_per_bundle=3))
    anchor = bundles[0].items[0].item_id
    row_of = {item_id: i for i, item_id in enumerate(items.ids)}
    cat = items.categories[row_of[anchor]]
    others = [r for r in range(len(items)) if items.categories[r] not in ("", cat)]
    x = others[0]
    y = next(r for r in others if items.categories[r] != items.categories[x])
    return "soda", anchor, items.ids[x], items.ids[y]


def _first_complement(client, query: str, anchor: str, **kwargs) -> tuple[str, str]:
    for b in client.recommend(query, max_bundles=10, max_items_per_bundle=3, **kwargs):
        if b.items[0].item_id == anchor:
            return b.items[1].item_id, b.reason
    raise AssertionError("the anchor's bundle was not served")


def test_served_complements_follow_request_counts(client, tiny_artifact):
    items = ItemTable.read(tiny_artifact / "items.jsonl")
    query, anchor, x, y = _anchor_and_two_others(client, items)
    now = time.time()
    first, reason = _first_complement(client, query, anchor, recent_item_counts={x: 9, y: 1})
    assert first == x and reason.startswith(PERSONAL_REASON)
    assert _first_complement(client, query, anchor, recent_item_counts={x: 1, y: 9})[0] == y  # the heavily bought one
    # same counts: the recently bought one wins; bought a year ago weighs little
    recent = [item_count(x, 5, last_seen=now - 400 * 86400), item_count(y, 5, last_seen=now - 86400)]
    assert _first_complement(client, query, anchor, recent_item_counts=recent)[0] == y


def test_recorded_purchase_counts_personalize_served_complements(tiny_artifact, tmp_path):
    srv = ServerThread(server_settings(tiny_artifact, events_db=tmp_path / "events.sqlite3")).start()
    try:
        with Client(srv.target) as c:
            items = ItemTable.read(tiny_artifact / "items.jsonl")
            query, anchor, x, y = _anchor_and_two_others(c, items)
            buy = lambda item: pb.Event(user_id="s1", item_id=item, type=pb.EVENT_TYPE_PURCHASE)  # noqa: E731
            c.record_events([buy(x)] * 4 + [buy(y)])
            assert _first_complement(c, query, anchor, user_id="s1")[0] == x
            c.record_events([buy(y)] * 8)
            assert _first_complement(c, query, anchor, user_id="s1")[0] == y
            # the request's counts take precedence over the recorded ones
            assert _first_complement(c, query, anchor, user_id="s1", recent_item_counts={x: 3})[0] == x
    finally:
        srv.stop()


def test_personal_shortlist_gives_the_same_bundles(tiny_artifact):
    """Each anchor looks only at the first items of the shopper it could take (PersonalOrder): same bundles as
    scoring all of them, over random shoppers, anchors, sizes and filters."""
    import random

    from bundlerec_server import artifact as A
    from bundlerec_server.bundling import PersonalOrder, make_bundle
    from bundlerec_server.catalog import Catalog
    from bundlerec_server.domain import Filters, Hit
    from bundlerec_server.filters import RowFilter

    cat = Catalog.from_table(A.ItemTable.read(tiny_artifact / A.ITEMS))
    comp = A.Complements.read(tiny_artifact / A.COMPLEMENTS)
    rng = random.Random(3)
    n = len(cat)
    compared = 0
    for trial in range(200):
        personal = {r: rng.random() for r in rng.sample(range(n), rng.randint(1, 60))}
        excluded = frozenset(cat.ids[r] for r in rng.sample(range(n), 5)) if trial % 2 else frozenset()
        allowed = RowFilter.resolve(Filters(exclude_ids=excluded), cat)
        weight = rng.choice([0.0, 0.5, 0.85, 1.0])
        order = PersonalOrder(personal, weight, allowed)
        anchor = Hit(rng.randrange(n), 0.5)
        items = rng.randint(2, 6)
        full = make_bundle(anchor, cat, comp, allowed, items, 0.25, personal=personal, personal_weight=weight)
        short = make_bundle(anchor, cat, comp, allowed, items, 0.25, personal=personal, personal_weight=weight,
                            personal_order=order)
        assert short == full
        compared += full is not None and len(full.items) > 1
    assert compared > 100
