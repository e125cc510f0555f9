"""Features of a (query, candidate) pair for the learned hybrid ranker: computed in the server from what the
artifact has (catalog titles, embeddings, BM25 index, quality prior), vectorised over a query's ~100-130
candidates. The export trains on exactly these (``bundlerec_export.train_ranker``); the model records the
feature list; the server scores a model over any subset of :data:`FEATURES` (an older model keeps working) and
refuses one that names a feature it does not compute.

Title-side evidence is precomputed once per catalog (:class:`TitleFeatures`):

* words: lower-cased tokens ``[a-z]+`` and numbers ``\\d+([./]\\d+)*`` (``1/2``, ``3.5``), a few stopwords dropped;
* numbers with units: a number followed by a unit (``1/2 in.``, ``1/2"``, ``60-in``, ``3/4 inch``, ``5 gal``,
  ``60-Watt``, ``2 sq. ft.``), canonicalised to ``<number><unit>`` (``1/2in``, ``60w``); ``1 1/2`` and
  ``1-1/2`` are the same number;
* character trigrams of the title with spaces and punctuation removed (posting lists, like the words);
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
    "idf_coverage", "missing_idf", "query_max_idf",  # idf-weighted share of the query's words; rarest missing; rarest
    "trigram_recall",  # share of the query's character trigrams in the title (typos, compounds: "deckover")
)
BRAND_MIN_TITLES = 3
MISSING_RANK = 1000.0  # the rank feature of a candidate the other list did not return (independent of the pool)
STOPWORDS = frozenset({"a", "an", "the", "and", "or", "for", "with", "of", "to", "in", "on", "by", "x", "is", "at"})
_WORD = re.compile(r"[a-z]+|\d+(?:[./]\d+)*")
_NUMBER = re.compile(r"\d")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")
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


def trigrams_of(text: str) -> frozenset[str]:
    """Character trigrams of the lower-cased text with everything but letters and digits removed."""
    s = _NOT_ALNUM.sub("", text.lower())
    return frozenset(s[i:i + 3] for i in range(len(s) - 2))


@dataclass(frozen=True)
class QueryText:
    words: tuple[str, ...]  # distinct, in order
    numbers: frozenset[str]
    units: frozenset[str]
    bigrams: tuple[str, ...]  # "w1 w2" of consecutive lower-cased raw words
    phrase: str  # lower-cased, whitespace collapsed
    trigrams: frozenset[str]


@functools.lru_cache(maxsize=4096)
def parse_query_text(text: str) -> QueryText:
    raw = _WORD.findall(text.lower())
    words = tuple(dict.fromkeys(w for w in raw if w not in STOPWORDS))
    return QueryText(words, frozenset(w for w in words if _NUMBER.match(w)), units_of(text),
                     tuple(f"{a} {b}" for a, b in zip(raw, raw[1:], strict=False)), " ".join(raw), trigrams_of(text))


def _postings(sets: Sequence[frozenset[str]]) -> dict[str, np.ndarray]:
    """token -> ascending rows whose set has it."""
    out: dict[str, list[int]] = {}
    for row, tokens in enumerate(sets):
        for t in tokens:
            out.setdefault(t, []).append(row)
    return {t: np.array(rows, dtype=np.int64) for t, rows in out.items()}


def _has(postings: dict[str, np.ndarray], token: str, rows: np.ndarray) -> np.ndarray:
    """Whether each of ``rows`` has ``token`` (a binary search in its posting list)."""
    plist = postings.get(token)
    if plist is None:
        return np.zeros(len(rows), dtype=bool)
    hit: np.ndarray = plist[np.minimum(np.searchsorted(plist, rows), len(plist) - 1)] == rows
    return hit


class RowTokens:
    """Each title's distinct tokens as ids (one flat int32 array, offsets per row): the share of a query's tokens
    each candidate title has is one gather over the candidates' tokens, whatever the number of query tokens
    (a query has ~20 character trigrams; a posting-list probe per token would cost ~5 us each). Words and units,
    a few a query, keep their posting lists: this for them too measured 0.25 against 0.23 ms a query."""

    def __init__(self, sets: Sequence[frozenset[str]]) -> None:
        self.ids: dict[str, int] = {}
        lists = [[self.ids.setdefault(t, len(self.ids)) for t in tokens] for tokens in sets]
        self.offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=self.offsets[1:])
        self.flat = np.fromiter((i for x in lists for i in x), dtype=np.int32, count=int(self.offsets[-1]))

    def fraction(self, tokens: Sequence[str] | frozenset[str], rows: np.ndarray) -> np.ndarray:
        """Fraction of ``tokens`` (known to the catalog or not) each of ``rows`` has (0 when there are none)."""
        out = np.zeros(len(rows), dtype=np.float32)
        ids = [i for t in tokens if (i := self.ids.get(t)) is not None]
        if not ids or not len(rows):
            return out
        wanted = np.zeros(len(self.ids), dtype=bool)
        wanted[ids] = True
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        sizes = ends - starts
        at = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
        # one False appended: every start (an empty last row's too) is inside the array; reduceat gives an empty
        # row one element of its neighbour, hence the where
        hit = np.append(wanted[self.flat[at]], False)
        counts = np.add.reduceat(hit, np.cumsum(sizes) - sizes, dtype=np.int64)
        out[:] = np.where(sizes > 0, counts, 0)
        return out / np.float32(len(tokens))


class TitleFeatures:
    """Per-title evidence, computed once per catalog (about a second for 55k titles): posting lists of words and
    numbers-with-units, a brand code per title, the lower-cased title text for phrase matches."""

    def __init__(self, titles: Sequence[str]) -> None:
        words = [frozenset(words_of(t)) for t in titles]
        self.words = _postings(words)
        self.units = _postings([units_of(t) for t in titles])
        self.trigrams = RowTokens([trigrams_of(t) for t in titles])
        self.text = [" ".join(_WORD.findall(t.lower())) for t in titles]  # the phrase/bigram haystack
        self.n_words = np.array([len(w) for w in words], dtype=np.float32)
        first = [m.group(0) if (m := re.match(r"[a-z]+", t.strip().lower())) else "" for t in titles]
        counts: dict[str, int] = {}
        for b in first:
            if b:
                counts[b] = counts.get(b, 0) + 1
        brands = sorted(b for b, c in counts.items() if c >= BRAND_MIN_TITLES and b not in STOPWORDS)
        self.brand_code = {b: i for i, b in enumerate(brands)}
        self.brand = np.array([self.brand_code.get(b, -1) for b in first], dtype=np.int32)  # -1: no known brand


def _fraction(postings: dict[str, np.ndarray], tokens: Sequence[str] | frozenset[str], rows: np.ndarray) -> np.ndarray:
    """Fraction of ``tokens`` each of ``rows`` has (0 when there are none)."""
    out = np.zeros(len(rows), dtype=np.float32)
    for t in tokens:
        out += _has(postings, t, rows)
    return out / max(len(tokens), 1)


def _ranks(rows: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """1-based position of each of ``rows`` (ascending, unique) in ``ranked``; MISSING_RANK where absent."""
    out = np.full(len(rows), MISSING_RANK, dtype=np.float32)
    if len(ranked):
        at = np.searchsorted(rows, ranked)
        out[at] = np.arange(1, len(ranked) + 1, dtype=np.float32)
    return out


def feature_matrix(titles: TitleFeatures, lexical: Lexical, text: str, c: Candidates, dense_rows: np.ndarray,
                   lexical_rows: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """(candidates, len(FEATURES)) matrix, columns in :data:`FEATURES` order (float64: what LightGBM scores
    without a copy; values computed in float32); ``dense_rows`` and ``lexical_rows`` are the two candidate lists
    best first (every one of them in ``c.rows``). With ``keep`` (ascending positions in ``c.rows``), only those
    candidates' rows, equal to the full matrix's rows ``keep``: set-level features (min-max scaling, the gap to
    the best cosine, ranks) still see every candidate; per-title evidence is computed for the kept ones only."""
    q = parse_query_text(text)
    n_all = len(c.rows)
    sel = np.arange(n_all) if keep is None else keep
    rows = c.rows[sel]
    n = len(rows)
    x = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return x
    cosine_all = c.cosine.astype(np.float32)
    cosine = cosine_all[sel]
    corrected = lexical.query_ids(text) != lexical.query_ids(text, corrected=False)
    bm25 = c.bm25[sel]
    bm25_raw = lexical.score_rows(text, rows, corrected=False)[0] if corrected else bm25
    coverage_raw = _fraction(titles.words, q.words, rows)
    numbers = _fraction(titles.words, q.numbers, rows)
    units = _fraction(titles.units, q.units, rows)
    query_brands = [titles.brand_code[w] for w in q.words if w in titles.brand_code]
    brand = np.isin(titles.brand[rows], query_brands) if query_brands else np.zeros(n, dtype=bool)
    if q.phrase or q.bigrams:
        cand_text = [titles.text[r] for r in rows.tolist()]
        phrase = np.fromiter((q.phrase in t for t in cand_text), np.float32, n)
        bigrams = np.fromiter((sum(b in t for b in q.bigrams) for t in cand_text), np.float32, n) / max(len(q.bigrams), 1)
    else:
        phrase = bigrams = np.zeros(n, dtype=np.float32)
    idf_coverage, missing_idf, query_max_idf = lexical.idf_evidence(text, rows)
    dense_rank = _ranks(c.rows, dense_rows)[sel]
    lexical_rank = _ranks(c.rows, lexical_rows)[sel]
    columns = (
        cosine, min_max(cosine_all)[sel], cosine - cosine_all.max(),
        bm25, min_max(c.bm25)[sel], bm25_raw,
        c.coverage[sel], coverage_raw, (coverage_raw >= 1.0),
        numbers, units, brand, phrase, bigrams,
        titles.n_words[rows], c.quality[sel], dense_rank, lexical_rank, (dense_rank < MISSING_RANK) & (lexical_rank < MISSING_RANK),
        len(q.words), len(q.numbers), len(q.units), bool(query_brands), corrected,
        idf_coverage, missing_idf, query_max_idf, titles.trigrams.fraction(q.trigrams, rows),
    )
    for j, col in enumerate(columns):
        x[:, j] = col
    return x
