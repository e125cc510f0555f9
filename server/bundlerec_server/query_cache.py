"""A bounded LRU of query embeddings, one per :class:`~bundlerec_server.runtime.Serving` snapshot.

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
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

HITS = Counter("bundlerec_query_cache_hits_total", "Query embeddings served from the query cache")
MISSES = Counter("bundlerec_query_cache_misses_total", "Query embeddings computed by the encoder (cache on, not cached)")
ENTRIES = Gauge("bundlerec_query_cache_entries", "Query embeddings held by the current query cache",
                multiprocess_mode="livesum")  # with --workers N: summed over the live workers

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


class QueryCache:
    """Bounded LRU: text -> read-only float32 query vector (the encoder's output, before personalisation).

    Thread-safe (one lock around each lookup or insert). ``hits``/``misses`` count lookups; the Prometheus
    counters above count the same across snapshots."""

    def __init__(self, capacity: int, variant: str, version: str, normalise: Callable[[str], str] = exact) -> None:
        if capacity < 1:
            raise ValueError("a query cache holds at least one entry (use no cache for size 0)")
        self.capacity, self.variant, self.version, self.normalise = capacity, variant, version, normalise
        self._entries: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, text: str) -> tuple[str, str, str]:
        return self.normalise(text), self.variant, self.version

    def get(self, text: str) -> np.ndarray | None:
        key = self.key(text)
        with self._lock:
            vec = self._entries.get(key)
            if vec is None:
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        (MISSES if vec is None else HITS).inc()
        return vec

    def put(self, text: str, vec: np.ndarray) -> np.ndarray:
        """Stores a private, read-only copy of ``vec`` (a row of a batch would keep the batch alive) and
        returns it."""
        own = np.array(vec, dtype=np.float32, copy=True)
        own.setflags(write=False)
        key = self.key(text)
        with self._lock:
            self._entries[key] = own
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            size = len(self._entries)
        ENTRIES.set(size)
        return own

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "capacity": self.capacity}


def for_engine(engine: Any, capacity: int) -> QueryCache | None:
    """A fresh cache for ``engine`` (None when ``capacity`` is 0: off)."""
    if capacity <= 0:
        return None
    tokenizer = getattr(getattr(engine, "encoder", None), "tokenizer", None)
    cache = QueryCache(capacity, str(getattr(engine, "variant", "")), str(getattr(engine, "version", "")),
                       key_function(tokenizer))
    ENTRIES.set(0)
    return cache
