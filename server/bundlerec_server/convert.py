"""Protobuf <-> domain translation, including validation of every request field against documented limits.

Validation collects every violation of a request (not only the first) and raises one
:class:`~bundlerec_server.errors.InvalidRequest`, which becomes INVALID_ARGUMENT with a google.rpc.BadRequest.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Iterable
from typing import cast

from google.protobuf import timestamp_pb2

from bundlerec.v1 import bundlerec_pb2 as pb

from .catalog import Catalog
from .domain import BundleOut, Filters, Hit, ItemCount, Mode, RecommendQuery, RerankOutcome, SearchQuery, Stop
from .errors import InvalidRequest, Violation
from .events import EventRecord
from .settings import Settings

USER_ID_RE = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")
MAX_ID_CHARS = 128
MAX_CATEGORY_CHARS = 128
MAX_ITEM_COUNT = 1_000_000
FUTURE_SLACK_MS = 24 * 3600 * 1000  # timestamps up to a day ahead are accepted (clock skew)

_MODES = {
    pb.RETRIEVAL_MODE_UNSPECIFIED: None,
    pb.RETRIEVAL_MODE_DENSE: Mode.DENSE,
    pb.RETRIEVAL_MODE_LEXICAL: Mode.LEXICAL,
    pb.RETRIEVAL_MODE_HYBRID: Mode.HYBRID,
}
MODE_TO_PB = {v: k for k, v in _MODES.items() if v is not None}
STOP_TO_PB = {
    Stop.COMPLETE: pb.STOP_REASON_COMPLETE,
    Stop.DEADLINE: pb.STOP_REASON_DEADLINE,
    Stop.NO_MATCH: pb.STOP_REASON_NO_MATCH,
}

_RERANK = {pb.RERANK_UNSPECIFIED: None, pb.RERANK_ON: True, pb.RERANK_OFF: False}
RERANK_TO_PB = {
    RerankOutcome.NOT_USED: pb.RERANK_OUTCOME_NOT_USED,
    RerankOutcome.APPLIED: pb.RERANK_OUTCOME_APPLIED,
    RerankOutcome.SKIPPED_DEADLINE: pb.RERANK_OUTCOME_SKIPPED_DEADLINE,
}


def check_rerank(value: int, out: list[Violation]) -> bool | None:
    if value not in _RERANK:
        out.append(Violation("rerank", f"unknown rerank value {value}"))
        return None
    return _RERANK[cast("pb.Rerank", value)]


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_query(query: str, settings: Settings, out: list[Violation]) -> str:
    text = query.strip()
    if not text:
        out.append(Violation("query", "required: a non-blank query"))
    elif len(text) > settings.max_query_chars:
        out.append(Violation("query", f"{len(text)} characters; at most {settings.max_query_chars}"))
    return text


def check_item_id(value: str, name: str, out: list[Violation]) -> None:
    if not value or len(value) > MAX_ID_CHARS or _has_control(value) or value != value.strip():
        out.append(Violation(name, f"an item id is 1 to {MAX_ID_CHARS} characters, no control characters or surrounding spaces"))


def check_ids(values: Iterable[str], name: str, limit: int, out: list[Violation]) -> tuple[str, ...]:
    values = tuple(values)
    if len(values) > limit:
        out.append(Violation(name, f"{len(values)} ids; at most {limit}"))
        return values
    for i, value in enumerate(values):
        check_item_id(value, f"{name}[{i}]", out)
    return values


def _timestamp_ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def check_item_counts(values: Iterable[pb.ItemCount], name: str, limit: int, now_ms: int,
                      out: list[Violation]) -> tuple[ItemCount, ...]:
    """``recent_item_counts``: at most ``limit`` entries, each item once, count 1..MAX_ITEM_COUNT, timestamps
    after 1970 and at most a day ahead, first_seen only with last_seen and not after it."""
    values = tuple(values)
    if len(values) > limit:
        out.append(Violation(name, f"{len(values)} items; at most {limit}"))
        return ()
    seen: set[str] = set()
    counts = []
    for i, v in enumerate(values):
        field_name = f"{name}[{i}]"
        check_item_id(v.item_id, f"{field_name}.item_id", out)
        if v.item_id in seen:
            out.append(Violation(f"{field_name}.item_id", f"{v.item_id!r} appears more than once"))
        seen.add(v.item_id)
        if not 1 <= v.count <= MAX_ITEM_COUNT:
            out.append(Violation(f"{field_name}.count", f"{v.count}; must be 1 to {MAX_ITEM_COUNT}"))
        stamps: dict[str, int | None] = {}
        for ts_name in ("last_seen", "first_seen"):
            stamps[ts_name] = None
            if v.HasField(ts_name):
                ms = _timestamp_ms(getattr(v, ts_name))
                if ms <= 0 or ms > now_ms + FUTURE_SLACK_MS:
                    out.append(Violation(f"{field_name}.{ts_name}", "must be after 1970 and not more than a day in the future"))
                stamps[ts_name] = ms
        first, last = stamps["first_seen"], stamps["last_seen"]
        if first is not None and last is None:
            out.append(Violation(f"{field_name}.first_seen", "needs last_seen"))
        elif first is not None and last is not None and first > last:
            out.append(Violation(f"{field_name}.first_seen", "must not be after last_seen"))
        counts.append(ItemCount(v.item_id, int(v.count), first, last))
    return tuple(counts)


def check_mode(value: int, name: str, out: list[Violation]) -> Mode | None:
    if value not in _MODES:
        out.append(Violation(name, f"unknown retrieval mode {value}"))
        return None
    return _MODES[cast("pb.RetrievalMode", value)]


def check_filters(f: pb.Filters, settings: Settings, out: list[Violation], prefix: str = "filters") -> Filters:
    cats = {}
    for name in ("include_categories", "exclude_categories"):
        values = list(getattr(f, name))
        if len(values) > settings.max_categories:
            out.append(Violation(f"{prefix}.{name}", f"{len(values)} categories; at most {settings.max_categories}"))
        for i, c in enumerate(values):
            if not c.strip() or len(c) > MAX_CATEGORY_CHARS or _has_control(c):
                out.append(Violation(f"{prefix}.{name}[{i}]", f"a category is 1 to {MAX_CATEGORY_CHARS} printable characters"))
        cats[name] = frozenset(c.strip().lower() for c in values)
    max_price = None
    if f.HasField("max_bundle_price"):
        max_price = f.max_bundle_price
        if not math.isfinite(max_price) or max_price <= 0:
            out.append(Violation(f"{prefix}.max_bundle_price", "must be a finite number > 0"))
    excluded = check_ids(f.exclude_item_ids, f"{prefix}.exclude_item_ids", settings.max_excluded_items, out)
    return Filters(
        include_categories=cats["include_categories"], exclude_categories=cats["exclude_categories"],
        max_price=max_price, exclude_ids=frozenset(excluded),
    )


def recommend_query(req: pb.RecommendRequest, settings: Settings, now_ms: int | None = None) -> RecommendQuery:
    out: list[Violation] = []
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    query = check_query(req.query, settings, out)
    if req.user_id and not USER_ID_RE.match(req.user_id):
        out.append(Violation("user_id", "1 to 128 characters of A-Z a-z 0-9 _ . : @ -"))
    recent = check_ids(req.recent_item_ids, "recent_item_ids", settings.max_recent_items, out)
    counts = check_item_counts(req.recent_item_counts, "recent_item_counts", settings.max_recent_item_counts, now_ms, out)
    if req.max_bundles > settings.max_bundles_cap:
        out.append(Violation("max_bundles", f"{req.max_bundles}; at most {settings.max_bundles_cap} (0 = default {settings.default_max_bundles})"))
    if req.max_items_per_bundle > settings.max_items_per_bundle_cap:
        out.append(Violation("max_items_per_bundle", f"{req.max_items_per_bundle}; at most {settings.max_items_per_bundle_cap} (0 = default {settings.default_items_per_bundle})"))
    filters = check_filters(req.filters, settings, out)
    mode = check_mode(req.retrieval_mode, "retrieval_mode", out)
    rerank = check_rerank(req.rerank, out)
    if out:
        raise InvalidRequest(out)
    return RecommendQuery(
        query=query, user_id=req.user_id, recent_item_ids=recent, recent_item_counts=counts,
        max_bundles=req.max_bundles or settings.default_max_bundles,
        items_per_bundle=req.max_items_per_bundle or settings.default_items_per_bundle,
        filters=filters, mode=mode, rerank=rerank,
    )


def search_query(req: pb.SearchRequest, settings: Settings) -> SearchQuery:
    out: list[Violation] = []
    query = check_query(req.query, settings, out)
    if req.k > settings.max_search_k:
        out.append(Violation("k", f"{req.k}; at most {settings.max_search_k} (0 = default 10)"))
    filters = check_filters(req.filters, settings, out)
    mode = check_mode(req.retrieval_mode, "retrieval_mode", out)
    rerank = check_rerank(req.rerank, out)
    if out:
        raise InvalidRequest(out)
    return SearchQuery(query=query, k=req.k or 10, filters=filters, mode=mode, rerank=rerank)


_EVENT_TYPES = {pb.EVENT_TYPE_VIEW, pb.EVENT_TYPE_CLICK, pb.EVENT_TYPE_ADD_TO_CART, pb.EVENT_TYPE_PURCHASE}


def event_record(ev: pb.Event, index: int, now_ms: int) -> EventRecord:
    """Validates one event of a RecordEvents stream; field paths name its position (``events[3].user_id``)."""
    out: list[Violation] = []
    if not USER_ID_RE.match(ev.user_id):
        out.append(Violation(f"events[{index}].user_id", "required: 1 to 128 characters of A-Z a-z 0-9 _ . : @ -"))
    check_item_id(ev.item_id, f"events[{index}].item_id", out)
    if ev.type not in _EVENT_TYPES:
        out.append(Violation(f"events[{index}].type", "required: VIEW, CLICK, ADD_TO_CART or PURCHASE"))
    ts_ms = now_ms
    if ev.HasField("timestamp"):
        ts_ms = _timestamp_ms(ev.timestamp)
        if ts_ms <= 0 or ts_ms > now_ms + FUTURE_SLACK_MS:
            out.append(Violation(f"events[{index}].timestamp", "must be after 1970 and not more than a day in the future"))
    if out:
        raise InvalidRequest(out)
    return EventRecord(ev.user_id, ev.item_id, int(ev.type), ts_ms)


def _price(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 2)


def bundle_message(bundle: BundleOut, rank: int, catalog: Catalog) -> pb.RecommendResponse:
    items = []
    for it in bundle.items:
        msg = pb.BundleItem(
            item_id=catalog.ids[it.row], title=catalog.titles[it.row], category=catalog.categories[it.row],
            role=pb.ITEM_ROLE_ANCHOR if it.is_anchor else pb.ITEM_ROLE_COMPLEMENT, score=it.score,
        )
        price = _price(catalog.prices[it.row])
        if price is not None:
            msg.price = price
        items.append(msg)
    out = pb.Bundle(rank=rank, score=bundle.score, items=items, reason=bundle.reason)
    if bundle.total_price is not None:
        out.total_price = round(bundle.total_price, 2)
    return pb.RecommendResponse(bundle=out)


def search_hit(hit: Hit, catalog: Catalog) -> pb.SearchHit:
    msg = pb.SearchHit(
        item_id=catalog.ids[hit.row], title=catalog.titles[hit.row], score=hit.score,
        category=catalog.categories[hit.row],
    )
    price = _price(catalog.prices[hit.row])
    if price is not None:
        msg.price = price
    return msg
