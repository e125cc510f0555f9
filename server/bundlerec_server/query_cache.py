"""Bounded LRUs of query embeddings and of whole Recommend replies, one each per
:class:`~bundlerec_server.runtime.Serving` snapshot.

What is cached is the encoder's output for a query text, BEFORE personalisation (the history blend happens
per call, after the lookup), so a hit returns exactly the vector a miss would compute: the served graphs are
batch-exact (or run one text at a time), hence a text's vector does not depend on when or with whom it was
encoded. Keys are (normalised text, model variant, artifact version). The cache lives with the engine and
its micro-batcher in one ``Serving``: a hot reload gets a new, empty cache, and a call that still holds the
old snapshot reads and fills only the old one.

Normalisation is conservative: the exact text, except that runs of ASCII whitespace (space, tab, CR, LF)
are collapsed to one space and trimmed at the ends, and only when the artifact's tokenizer provably gives
the same tokens for both (a BERT normaliser with ``clean_text`` and a whitespace-splitting pre-tokenizer,
confirmed by a probe at construction). Case, accents and Unicode whitespace are never folded here.

The reply caches sit beside the query cache (on with it unless ``reply_cache`` is off): for a Recommend request
that nothing personalises, the bundle messages a miss built are reused as they are, so a hit skips retrieval and
bundling too; a Search request's whole response likewise. What is per call (pacing, stop reason, summary,
metrics) is never cached. Each cache has its :class:`~bundlerec_server.flight.Flights`: concurrent misses of one
key compute it once.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from .domain import Mode, RecommendQuery, SearchQuery
from .flight import Budget, Flights

HITS = Counter("bundlerec_query_cache_hits_total", "Query embeddings served from the query cache")
MISSES = Counter("bundlerec_query_cache_misses_total", "Query embeddings computed by the encoder (cache on, not cached)")
ENTRIES = Gauge("bundlerec_query_cache_entries", "Query embeddings held by the current query cache",
                multiprocess_mode="livesum")  # with --workers N: summed over the live workers
REPLY_HITS = Counter("bundlerec_reply_cache_hits_total", "Recommend replies served from the reply cache")
REPLY_MISSES = Counter("bundlerec_reply_cache_misses_total", "Recommend replies computed (reply cache on, request cacheable, not cached)")
REPLY_ENTRIES = Gauge("bundlerec_reply_cache_entries", "Recommend replies held by the current reply cache",
                      multiprocess_mode="livesum")
SEARCH_HITS = Counter("bundlerec_search_cache_hits_total", "Search replies served from the search reply cache")
SEARCH_MISSES = Counter("bundlerec_search_cache_misses_total", "Search replies computed (reply cache on, request cacheable, not cached)")
SEARCH_ENTRIES = Gauge("bundlerec_search_cache_entries", "Search replies held by the current search reply cache",
                       multiprocess_mode="livesum")
COALESCED = Counter("bundlerec_query_cache_coalesced_total", "Query embeddings a call took from another call's encode in flight")
REPLY_COALESCED = Counter("bundlerec_reply_cache_coalesced_total", "Recommend replies a call took from another call's computation in flight")
SEARCH_COALESCED = Counter("bundlerec_search_cache_coalesced_total", "Search replies a call took from another call's computation in flight")

_ASCII_WS = re.compile(r"[ \t\r\n]+")
# normalisers and pre-tokenizers (tokenizers' Python class names) under which ASCII whitespace runs only
# separate words: BertNormalizer(clean_text) maps \t \r \n to spaces, and these pre-tokenizers split on
# whitespace and drop it
_SAFE_NORMALIZERS = ("BertNormalizer",)
_SAFE_PRE_TOKENIZERS = ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")
_PROBE = ("milk", "  organic\tbaby  spinach \n", "gluten free\r\nwhole   wheat pasta", "a  , b", " 买一双  好穿的鞋子 ",
          "sparkling water 🍋  ", "ÉCLAIR\t\tau  chocolat", "x\u00a0 y", "x \u3000 y")


def collapse_whitespace(text: str) -> str:
    """Runs of ASCII whitespace to one space, trimmed: the cache's normalisation where it is proven safe."""
    return _ASCII_WS.sub(" ", text).strip(" ")


def exact(text: str) -> str:
    return text


def key_function(tokenizer: Any) -> Callable[[str], str]:
    """:func:`collapse_whitespace` when ``tokenizer`` (a ``tokenizers.Tokenizer``) gives the same token ids for a
    text and its collapsed form, by construction and on a probe; otherwise the exact text."""
    if tokenizer is None:
        return exact
    normalizer, pre = getattr(tokenizer, "normalizer", None), getattr(tokenizer, "pre_tokenizer", None)
    if type(normalizer).__name__ not in _SAFE_NORMALIZERS or not getattr(normalizer, "clean_text", False):
        return exact
    if type(pre).__name__ not in _SAFE_PRE_TOKENIZERS:
        return exact
    for text in _PROBE:
        if tokenizer.encode(text).ids != tokenizer.encode(collapse_whitespace(text)).ids:
            return exact
    return collapse_whitespace


class _LRU:
    """A bounded LRU under one lock (each lookup or insert), counting its lookups in ``hits``/``misses`` and in
    the given Prometheus counters (which count the same across snapshots), with the keys being computed now
    (``flights``, on the event loop)."""

    def __init__(self, capacity: int, hits: Counter, misses: Counter, coalesced: Counter) -> None:
        if capacity < 1:
            raise ValueError("a cache holds at least one entry (use no cache for size 0)")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._counters = (hits, misses)
        self.hits = 0
        self.misses = 0
        self.flights = Flights(coalesced)

    def _get(self, key: Hashable) -> Any:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        self._counters[value is None].inc()
        return value

    async def find_or_join(self, key: Hashable, budget: Budget) -> Any:
        """The entry under ``key``, else the result of another call computing it now (single-flight; OutOfTime when
        ``budget`` runs out first), else None: the caller computes it (and may lead). One counted lookup."""
        value = self._get(key)
        if value is None and self.flights.running(key):
            value = await self.flights.join(key, budget)
            if value is None:  # its leader had none; a next one may have stored it meanwhile (not a new lookup)
                with self._lock:
                    value = self._entries.get(key)
        return value

    def _put(self, key: Hashable, value: Any) -> int:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "capacity": self.capacity,
                "coalesced": self.flights.coalesced}


class QueryCache(_LRU):
    """Bounded LRU: text -> read-only float32 query vector (the encoder's output, before personalisation)."""

    def __init__(self, capacity: int, variant: str, version: str, normalise: Callable[[str], str] = exact) -> None:
        super().__init__(capacity, HITS, MISSES, COALESCED)
        self.variant, self.version, self.normalise = variant, version, normalise

    def key(self, text: str) -> tuple[str, str, str]:
        return self.normalise(text), self.variant, self.version

    def get(self, text: str) -> np.ndarray | None:
        vec: np.ndarray | None = self._get(self.key(text))
        return vec

    def put(self, text: str, vec: np.ndarray) -> np.ndarray:
        """Stores a private, read-only copy of ``vec`` (a row of a batch would keep the batch alive) and
        returns it."""
        own = np.array(vec, dtype=np.float32, copy=True)
        own.setflags(write=False)
        ENTRIES.set(self._put(self.key(text), own))
        return own


class ReplyCache(_LRU):
    """Bounded LRU: an impersonal Recommend request -> its reply's bundle messages, best first (a tuple of
    protobuf messages that nobody modifies: each call streams them under its own pacing and summary).

    Keys are the whole validated request (every field, so a new field is part of the key by default) with the
    retrieval mode resolved, the text normalised as the query cache does for dense retrieval (exact otherwise:
    BM25, spelling and the learned ranker read the text itself), the model variant and the artifact version.
    A personalised request (user id, recent items, purchase counts) or one that re-ranks (its outcome depends
    on the call's deadline) has no key: it never uses the cache."""

    _metrics = (REPLY_HITS, REPLY_MISSES, REPLY_COALESCED, REPLY_ENTRIES)

    def __init__(self, capacity: int, variant: str, version: str, normalise: Callable[[str], str] = exact) -> None:
        super().__init__(capacity, *self._metrics[:3])
        self.variant, self.version, self.normalise = variant, version, normalise
        self._metrics[3].set(0)

    def key(self, q: RecommendQuery | SearchQuery, mode: Mode, rerank: bool) -> Hashable | None:
        if rerank or isinstance(q, RecommendQuery) and (q.user_id or q.recent_item_ids or q.recent_item_counts):
            return None
        text = self.normalise(q.query) if mode is Mode.DENSE else q.query
        return dataclasses.replace(q, query=text, mode=mode, rerank=False), self.variant, self.version

    def get(self, key: Hashable) -> Any:
        return self._get(key)

    def put(self, key: Hashable, reply: Any) -> Any:
        """Stores ``reply`` (a sequence of messages: as a tuple) and returns what is stored."""
        own = tuple(reply) if isinstance(reply, Sequence) else reply
        self._metrics[3].set(self._put(key, own))
        return own


class SearchCache(ReplyCache):
    """Bounded LRU: a Search request that does not re-rank -> its whole ``SearchResponse`` (never modified after
    it is built), keyed as :class:`ReplyCache` keys (the whole validated ``SearchQuery``, mode resolved)."""

    _metrics = (SEARCH_HITS, SEARCH_MISSES, SEARCH_COALESCED, SEARCH_ENTRIES)


def for_engine(engine: Any, capacity: int) -> QueryCache | None:
    """A fresh cache for ``engine`` (None when ``capacity`` is 0: off)."""
    if capacity <= 0:
        return None
    tokenizer = getattr(getattr(engine, "encoder", None), "tokenizer", None)
    cache = QueryCache(capacity, str(getattr(engine, "variant", "")), str(getattr(engine, "version", "")),
                       key_function(tokenizer))
    ENTRIES.set(0)
    return cache


def replies_for(cache: QueryCache | None, kind: type[ReplyCache] = ReplyCache) -> ReplyCache | None:
    """A fresh reply cache of ``kind`` beside the query cache ``cache`` (same size, keys and normalisation); None
    without one."""
    if cache is None:
        return None
    return kind(cache.capacity, cache.variant, cache.version, cache.normalise)
