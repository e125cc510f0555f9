"""Features of a (query, candidate) pair for the learned hybrid ranker: computed in the server from what the
artifact has (catalog titles, embeddings, BM25 index, quality prior), vectorised over a query's ~100-130
candidates. The export trains on exactly these (``bundlerec_export.train_ranker``); the model records the
feature list and the server refuses a model whose list differs from :data:`FEATURES`.

Title-side evidence is precomputed once per catalog (:class:`TitleFeatures`):

* words: lower-cased tokens ``[a-z]+`` and numbers ``\\d+([./]\\d+)*`` (``1/2``, ``3.5``), a few stopwords dropped;
* numbers with units: a number followed by a unit (``1/2 in.``, ``1/2"``, ``60-in``, ``3/4 inch``, ``5 gal``,
  ``60-Watt``, ``2 sq. ft.``), canonicalised to ``<number><unit>`` (``1/2in``, ``60w``); ``1 1/2`` and
  ``1-1/2`` are the same number;
* brand: the title's first word when it starts with a letter (Home Depot titles start with the brand:
  "Husky 1/2 in. Drive ..."); a query mentions a brand when one of its words is the first word of at least
  :data:`BRAND_MIN_TITLES` titles.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .fusion import Candidates, min_max
from .lexical import Lexical

FEATURES = (
    "cosine", "cosine_scaled", "cosine_gap",  # exact query-title cosine; min-max over candidates; minus the best
    "bm25", "bm25_scaled", "bm25_raw",  # BM25 (spelling-corrected, as served); min-max; BM25 of the query as typed
    "coverage", "coverage_raw", "all_words",  # stemmed-word coverage (served); unstemmed; every query word present
    "numbers_matched", "units_matched", "brand_matched", "phrase", "bigrams",
    "title_words", "quality", "dense_rank", "lexical_rank", "in_both",
    "query_words", "query_numbers", "query_units", "query_brand", "spelling_changed",
)
BRAND_MIN_TITLES = 3
MISSING_RANK = 1000.0  # the rank feature of a candidate the other list did not return (independent of the pool)
STOPWORDS = frozenset({"a", "an", "the", "and", "or", "for", "with", "of", "to", "in", "on", "by", "x", "is", "at"})
_WORD = re.compile(r"[a-z]+|\d+(?:[./]\d+)*")
_NUMBER = re.compile(r"\d")
_UNITS = {
    "inches": "in", "inch": "in", "in": "in", '"': "in", "''": "in",
    "feet": "ft", "foot": "ft", "ft": "ft", "'": "ft",
    "gallons": "gal", "gallon": "gal", "gal": "gal",
    "pounds": "lb", "pound": "lb", "lbs": "lb", "lb": "lb",
    "ounces": "oz", "ounce": "oz", "oz": "oz",
    "volts": "v", "volt": "v", "v": "v",
    "watts": "w", "watt": "w", "w": "w",
    "amps": "amp", "amp": "amp",
    "mm": "mm", "cm": "cm", "btu": "btu",
    "quarts": "qt", "quart": "qt", "qt": "qt",
    "yards": "yd", "yard": "yd", "yd": "yd",
    "pieces": "pc", "piece": "pc", "pc": "pc",
}
_NUM_UNIT = re.compile(
    r"(\d+(?:\.\d+)?(?:[-\s]\d+/\d+)?|\d+/\d+)\s*-?\s*"
    r"(sq\.?\s*ft|cu\.?\s*ft|inches|inch|in\b|\"|''|feet|foot|ft\b|'|gallons?|gal\b|pounds?|lbs?\b|ounces?|oz\b|"
    r"volts?|v\b|watts?|w\b|amps?\b|mm\b|cm\b|btu\b|quarts?|qt\b|yards?|yd\b|pieces?|pc\b)")


def words_of(text: str) -> list[str]:
    """Lower-cased words and numbers of ``text``, stopwords dropped, in order."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def units_of(text: str) -> frozenset[str]:
    """Canonical number+unit tokens: ``1/2 in.`` and ``1/2"`` -> ``1/2in``; ``1 1/2 in`` -> ``1-1/2in``."""
    out = set()
    for num, unit in _NUM_UNIT.findall(text.lower()):
        num = re.sub(r"\s+", "-", num)
        unit = re.sub(r"[.\s]", "", unit)
        out.add(num + _UNITS.get(unit, unit))
    return frozenset(out)


@dataclass(frozen=True)
class QueryText:
    words: tuple[str, ...]  # distinct, in order
    numbers: frozenset[str]
    units: frozenset[str]
    bigrams: tuple[str, ...]  # "w1 w2" of consecutive lower-cased raw words
    phrase: str  # lower-cased, whitespace collapsed


@functools.lru_cache(maxsize=4096)
def parse_query_text(text: str) -> QueryText:
    raw = _WORD.findall(text.lower())
    words = tuple(dict.fromkeys(w for w in raw if w not in STOPWORDS))
    return QueryText(words, frozenset(w for w in words if _NUMBER.match(w)), units_of(text),
                     tuple(f"{a} {b}" for a, b in zip(raw, raw[1:], strict=False)), " ".join(raw))


class TitleFeatures:
    """Per-title evidence, computed once per catalog (about a second for 55k titles)."""

    def __init__(self, titles: Sequence[str]) -> None:
        self.words = [frozenset(words_of(t)) for t in titles]
        self.units = [units_of(t) for t in titles]
        self.text = [" ".join(_WORD.findall(t.lower())) for t in titles]  # the phrase/bigram haystack
        self.n_words = np.array([len(w) for w in self.words], dtype=np.float32)
        first = [m.group(0) if (m := re.match(r"[a-z]+", t.strip().lower())) else "" for t in titles]
        self.brand = first
        counts: dict[str, int] = {}
        for b in first:
            if b:
                counts[b] = counts.get(b, 0) + 1
        self.brands = frozenset(b for b, c in counts.items() if c >= BRAND_MIN_TITLES and b not in STOPWORDS)


def _ranks(rows: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """1-based position of each of ``rows`` (ascending, unique) in ``ranked``; MISSING_RANK where absent."""
    out = np.full(len(rows), MISSING_RANK, dtype=np.float32)
    if len(ranked):
        at = np.searchsorted(rows, ranked)
        out[at] = np.arange(1, len(ranked) + 1, dtype=np.float32)
    return out


def feature_matrix(titles: TitleFeatures, lexical: Lexical, text: str, c: Candidates, dense_rows: np.ndarray,
                   lexical_rows: np.ndarray) -> np.ndarray:
    """(candidates, len(FEATURES)) float32 matrix, columns in :data:`FEATURES` order; ``dense_rows`` and
    ``lexical_rows`` are the two candidate lists best first (every one of them in ``c.rows``)."""
    q = parse_query_text(text)
    rows = c.rows
    n = len(rows)
    x = np.zeros((n, len(FEATURES)), dtype=np.float32)
    if n == 0:
        return x
    cosine = c.cosine.astype(np.float32)
    bm25_raw, _ = lexical.score_rows(text, rows, corrected=False)
    cand_words = [titles.words[r] for r in rows.tolist()]
    cand_text = [titles.text[r] for r in rows.tolist()]
    nq = max(len(q.words), 1)
    coverage_raw = np.fromiter((len(s.intersection(q.words)) for s in cand_words), np.float32, n) / nq
    numbers = np.fromiter((len(s.intersection(q.numbers)) for s in cand_words), np.float32, n) / max(len(q.numbers), 1)
    if q.units:
        units = np.fromiter((len(q.units.intersection(titles.units[r])) for r in rows.tolist()), np.float32, n) / len(q.units)
    else:
        units = np.zeros(n, dtype=np.float32)
    query_brands = titles.brands.intersection(q.words)
    brand = np.fromiter((titles.brand[r] in query_brands for r in rows.tolist()), np.float32, n)
    phrase = np.fromiter((q.phrase in t for t in cand_text), np.float32, n) if q.phrase else np.zeros(n, np.float32)
    if q.bigrams:
        bigrams = np.fromiter((sum(b in t for b in q.bigrams) for t in cand_text), np.float32, n) / len(q.bigrams)
    else:
        bigrams = np.zeros(n, dtype=np.float32)
    dense_rank = _ranks(rows, dense_rows)
    lexical_rank = _ranks(rows, lexical_rows)
    columns = (
        cosine, min_max(cosine), cosine - cosine.max(),
        c.bm25, min_max(c.bm25), bm25_raw,
        c.coverage, coverage_raw, (coverage_raw >= 1.0),
        numbers, units, brand, phrase, bigrams,
        titles.n_words[rows], c.quality, dense_rank, lexical_rank, (dense_rank < MISSING_RANK) & (lexical_rank < MISSING_RANK),
        len(q.words), len(q.numbers), len(q.units), bool(query_brands),
        lexical.query_ids(text) != lexical.query_ids(text, corrected=False),
    )
    for j, col in enumerate(columns):
        x[:, j] = col
    return x
