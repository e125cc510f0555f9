"""The loaded artifact and the request pipeline: encode -> retrieve -> bundle. No gRPC in here.

An :class:`Engine` is immutable once loaded; a hot reload builds a new one and swaps the reference, so a
request that started on one version finishes on it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from . import artifact as A
from .bundling import rank_bundles
from .domain import BundleOut, Filters, Hit, Mode, Personalization, RecommendQuery, SearchQuery
from .encoder import CUDA, Encoder
from .errors import InvalidRequest, Unsupported, Violation
from .settings import Settings
from .spelling import SpellCorrector

logger = logging.getLogger(__name__)

RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
CPU_PREFERENCE = ("int8_pertoken", "int8", "fp32")
# Probe for batch-exactness at load: each text alone vs all together (varied lengths, so padding differs).
EXACTNESS_PROBE = (
    "milk", "organic baby spinach", "gluten free whole wheat pasta sauce with basil and garlic",
    "买一双好穿的鞋子", "sparkling water 🍋", "dark chocolate", "frozen pizza margherita extra cheese", "eggs",
)
FUSION_METHODS = ("rrf", "blend", "scores")
BRUTE_FORCE_MAX_ROWS = 20_000  # restricted to categories this small, exact search beats over-fetching HNSW


@dataclass(frozen=True)
class Fusion:
    """How hybrid retrieval merges the dense and lexical lists.

    ``rrf``: reciprocal rank fusion, sum of 1 / (rrf_k + rank). ``blend``: alpha x dense + (1 - alpha) x lexical
    after min-max normalising each list's scores (an item missing from a list gets 0 for it). ``scores``: every
    candidate of either list gets its exact cosine and its exact BM25 score (not 0 when the other list missed
    it), each min-max normalised over the candidates, blended with alpha, plus ``coverage`` x the fraction of
    the query's words the title contains (:func:`fuse_scores`).
    """

    method: str = "rrf"
    alpha: float = 0.5
    rrf_k: int = RRF_K
    coverage: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        f = cls(method=str(d.get("method", "rrf")), alpha=float(d.get("alpha", 0.5)), rrf_k=int(d.get("rrf_k", RRF_K)),
                coverage=float(d.get("coverage", 0.0)))
        if f.method not in FUSION_METHODS or not 0.0 <= f.alpha <= 1.0 or f.rrf_k < 1 or f.coverage < 0:
            raise A.ArtifactError(f"invalid fusion settings {d}")
        return f


@dataclass(frozen=True)
class Candidates:
    """The union of a query's dense and lexical candidates with exact per-candidate evidence."""

    rows: np.ndarray  # int64, ascending
    cosine: np.ndarray  # query-title cosine
    bm25: np.ndarray  # BM25 score (0 when no query word matches)
    coverage: np.ndarray  # fraction of the query's distinct words found in the title
    quality: np.ndarray  # catalog quality prior (multiplies the fused score)


def _scale(x: np.ndarray) -> np.ndarray:
    lo, span = float(x.min()), float(x.max() - x.min())
    return (x - lo) / span if span > 0 else np.ones_like(x)


def fuse_scores(c: Candidates, fusion: Fusion, k: int) -> list[Hit]:
    """Top ``k`` candidates by (alpha x scaled cosine + (1 - alpha) x scaled BM25 + coverage weight x coverage)
    x quality; ties broken by row."""
    if len(c.rows) == 0:
        return []
    fused = fusion.alpha * _scale(c.cosine.astype(np.float64)) + (1.0 - fusion.alpha) * _scale(c.bm25.astype(np.float64))
    fused = (fused + fusion.coverage * c.coverage) * c.quality
    order = np.argsort(-fused, kind="stable")[:k]
    return [Hit(int(c.rows[i]), float(fused[i])) for i in order]


def _minmax(hits: list[Hit]) -> dict[int, float]:
    if not hits:
        return {}
    scaled = _scale(np.array([h.score for h in hits], dtype=np.float64))
    return {h.row: float(v) for h, v in zip(hits, scaled, strict=True)}


def fuse(dense: list[Hit], lexical: list[Hit], fusion: Fusion, k: int) -> list[Hit]:
    """Merges two best-first candidate lists into the top ``k`` (ties broken by first appearance)."""
    fused: dict[int, float] = {}
    if fusion.method == "rrf":
        for hits in (dense, lexical):
            for rank, hit in enumerate(hits):
                fused[hit.row] = fused.get(hit.row, 0.0) + 1.0 / (fusion.rrf_k + rank + 1)
    else:
        d, lx = _minmax(dense), _minmax(lexical)
        for row in [*d, *lx]:
            fused[row] = fusion.alpha * d.get(row, 0.0) + (1.0 - fusion.alpha) * lx.get(row, 0.0)
    best = sorted(fused.items(), key=lambda kv: -kv[1])[:k]
    return [Hit(row, score) for row, score in best]


@dataclass
class Catalog:
    ids: list[str]
    titles: list[str]
    categories: list[str]
    category_lower: list[str]
    category_codes: np.ndarray  # int32 code per row; code of "" for none
    codes_by_name: dict[str, int]
    prices: np.ndarray
    quality: np.ndarray
    row_of: dict[str, int]

    @classmethod
    def from_table(cls, table: A.ItemTable) -> Catalog:
        lower = [c.strip().lower() for c in table.categories]
        codes_by_name: dict[str, int] = {}
        codes = np.fromiter((codes_by_name.setdefault(c, len(codes_by_name)) for c in lower), dtype=np.int32, count=len(lower))
        return cls(
            table.ids, table.titles, table.categories, lower, codes, codes_by_name, table.prices, table.quality,
            {item_id: i for i, item_id in enumerate(table.ids)},
        )

    def __len__(self) -> int:
        return len(self.ids)


def _sort_postings(index: dict[str, Any]) -> None:
    """bm25s keeps one posting list per word (CSC: indptr, indices = doc rows, data = scores); score_rows
    binary-searches them, so make sure each list is in ascending row order."""
    indptr, indices, data = index["indptr"], index["indices"], index["data"]
    word = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    if len(indices) and not np.all((np.diff(indices) > 0) | (np.diff(word) > 0)):
        order = np.lexsort((indices, word))
        index["indices"], index["data"] = indices[order], data[order]


def _parse_query(tokenize: Callable, speller: SpellCorrector | None, vocab: dict[str, int], options: dict,
                 text: str) -> tuple[list[int], int]:
    """The (spelling-corrected) query's distinct vocabulary ids and its number of distinct words."""
    words = tokenize([speller.correct(text) if speller is not None else text], show_progress=False,
                     return_ids=False, **options)[0]
    return sorted({vocab[w] for w in words if w in vocab}), len(set(words))


class Lexical:
    """BM25 over titles (bm25s), tokenised exactly as at export time (settings from the manifest)."""

    def __init__(self, folder: Path, params: dict[str, Any], titles: Sequence[str] | None = None) -> None:
        # bm25s probes JAX at import when it is installed; on a GPU host JAX would then take ~75 % of the GPU in
        # every worker. Scoring and top-k below use bm25s's score matrix with numpy, so keep any JAX on the CPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import bm25s

        self.retriever = bm25s.BM25.load(str(folder))
        _sort_postings(self.retriever.scores)
        tok = params.get("tokenize", {})
        self.stopwords = tok.get("stopwords", "en")
        self.lower = bool(tok.get("lower", True))
        self.token_pattern = str(tok.get("token_pattern", r"(?u)\b\w\w+\b"))  # bm25s's default
        self.stemmer = None
        algorithm = (tok.get("stemmer") or {}).get("algorithm")
        if algorithm:
            import Stemmer

            self.stemmer = Stemmer.Stemmer(algorithm)
        # typos: query words unknown to the catalog are corrected against the titles' own words (None = off)
        self.speller = SpellCorrector(titles) if titles is not None else None
        # search and score_rows of one request (and repeated queries) tokenise once; per instance, so a reload
        # frees it. The cached function must not hold ``self`` (a cycle): the heap is frozen out of the cyclic
        # GC after a load, so an engine must be freed by reference counting alone.
        self._query = functools.lru_cache(maxsize=4096)(functools.partial(
            _parse_query, bm25s.tokenize, self.speller, self.retriever.vocab_dict,
            {"lower": self.lower, "stopwords": self.stopwords, "stemmer": self.stemmer, "token_pattern": self.token_pattern}))

    def search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows by BM25 (score > 0), best first, ties by row."""
        ids, _ = self._query(text)
        if not ids or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores = self.retriever.get_scores_from_ids(ids)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        top = top[scores[top] > 0]
        return top.astype(np.int64), scores[top].astype(np.float32)

    def score_rows(self, text: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact BM25 score of each of ``rows`` (ascending) and the fraction of the query's distinct words its
        title has: per query word, a binary search of ``rows`` in the word's posting list."""
        ids, n_words = self._query(text)
        bm25 = np.zeros(len(rows), dtype=np.float32)
        matched = np.zeros(len(rows), dtype=np.float32)
        index = self.retriever.scores
        for t in ids:
            lo, hi = int(index["indptr"][t]), int(index["indptr"][t + 1])
            if hi == lo:
                continue
            postings = index["indices"][lo:hi]
            at = np.minimum(np.searchsorted(postings, rows), hi - lo - 1)
            hit = postings[at] == rows
            bm25[hit] += index["data"][lo:hi][at[hit]]
            matched += hit
        return bm25, matched / max(n_words, 1)


class Engine:
    def __init__(self, root: Path, settings: Settings) -> None:
        t0 = time.perf_counter()
        self.root = Path(root)
        self.settings = settings
        self.manifest = A.read_manifest(self.root, verify=settings.verify_checksums)
        m = self.manifest
        self.version: str = m["artifact_version"]
        self.dim = int(m["embedding_dim"])
        table = A.ItemTable.read(self.root / A.ITEMS)
        self.catalog = Catalog.from_table(table)
        if len(self.catalog) != int(m["item_count"]):
            raise A.ArtifactError(f"{self.root}: items.jsonl has {len(self.catalog)} items, manifest says {m['item_count']}")
        self.embeddings = np.load(self.root / A.EMBEDDINGS, mmap_mode="r")
        if self.embeddings.shape != (len(self.catalog), self.dim):
            raise A.ArtifactError(f"{self.root}: embeddings.npy shape {self.embeddings.shape}, expected {(len(self.catalog), self.dim)}")
        self.complements = A.Complements.read(self.root / A.COMPLEMENTS)
        if len(self.complements.indptr) != len(self.catalog) + 1:
            raise A.ArtifactError(f"{self.root}: complements.npz does not cover {len(self.catalog)} items")
        idx = m.get("index", {})
        self.index = hnswlib.Index(space="cosine", dim=self.dim)
        self.index.load_index(str(self.root / A.INDEX), max_elements=len(self.catalog))
        if self.index.get_current_count() != len(self.catalog):
            raise A.ArtifactError(f"{self.root}: index holds {self.index.get_current_count()} items, catalog {len(self.catalog)}")
        self.ef = settings.ef_search or int(idx.get("ef_search", 64))
        self.index.set_ef(max(self.ef, settings.anchor_pool))
        self.lexical = None
        if (self.root / A.LEXICAL_DIR).is_dir():
            titles = self.catalog.titles if settings.spell_correction else None
            self.lexical = Lexical(self.root / A.LEXICAL_DIR, m.get("lexical", {}), titles)
        self.encoder, self.variant = self._load_encoder()
        if self.encoder.dim != self.dim:
            raise A.ArtifactError(f"{self.root}: encoder dimension {self.encoder.dim}, index {self.dim}")
        self.modes = [Mode.DENSE] + ([Mode.LEXICAL, Mode.HYBRID] if self.lexical else [])
        serving = m.get("serving", {})
        self.fusion = Fusion.from_dict({**serving.get("fusion", {}), **settings.fusion_overrides()})
        wanted = settings.retrieval_mode or serving.get("default_retrieval_mode", "dense")
        self.default_mode = Mode(wanted) if Mode(wanted) in self.modes else Mode.DENSE
        logger.info(
            "artifact %s loaded from %s: %d items, dim %d, encoder %s on %s, default retrieval %s (%.2fs)",
            self.version, self.root, len(self.catalog), self.dim, self.variant, self.encoder.provider,
            self.default_mode.value, time.perf_counter() - t0,
        )

    def _load_encoder(self) -> tuple[Encoder, str]:
        """fp16 on CUDA when a GPU is really usable; otherwise the best CPU graph the artifact has:
        per-token int8, then per-tensor dynamic int8, then fp32. Micro-batching is used only where the load-time
        probe finds the graph batch-exact on this hardware (see batch_exact)."""
        s = self.settings
        max_len = int(self.manifest.get("encoder", {}).get("max_query_tokens", 64))
        tok = self.root / A.TOKENIZER
        models = self.manifest.get("models", {})
        if s.model_variant:
            if s.model_variant not in models:
                raise A.ArtifactError(f"{self.root}: no {s.model_variant} graph in this artifact")
            enc = Encoder(self.root / A.MODEL_FILES[s.model_variant], tok, max_length=max_len, provider=s.provider,
                          intra_op_threads=s.intra_op_threads, fixed_rows=s.max_batch, fixed_rows_on_cuda_only=True)
            return enc, s.model_variant
        if s.provider in ("auto", "cuda") and "fp16" in models:
            enc = Encoder(self.root / A.MODEL_FILES["fp16"], tok, max_length=max_len, provider=s.provider,
                          intra_op_threads=s.intra_op_threads, fixed_rows=s.max_batch, fixed_rows_on_cuda_only=True)
            if enc.provider == CUDA:
                return enc, "fp16"
            if s.provider == "cuda":
                logger.warning("CUDA execution provider requested but not usable here; serving on CPU")
        variant = next(v for v in CPU_PREFERENCE if v in models)
        enc = Encoder(self.root / A.MODEL_FILES[variant], tok, max_length=max_len, provider="cpu", intra_op_threads=s.intra_op_threads)
        return enc, variant

    @functools.cached_property
    def batch_exact(self) -> bool:
        """Whether a query's embedding is independent of its batch mates with this graph on this hardware:
        measured, not assumed (each probe text alone vs all in one batch must agree bit for bit)."""
        probe = list(EXACTNESS_PROBE)
        together = self.encoder.encode(probe)
        alone = np.concatenate([self.encoder.encode([t]) for t in probe])
        exact = bool(np.array_equal(together, alone))
        logger.info("encoder %s on %s is %sbatch-exact (max |alone - batched| %.2e)", self.variant,
                    self.encoder.provider, "" if exact else "NOT ", float(np.abs(together - alone).max()))
        return exact

    # --- pipeline -------------------------------------------------------------------------------

    def warmup(self) -> None:
        self.encoder.warmup()
        _ = self.batch_exact  # the probe runs here, in the loading thread, not at swap time in the event loop
        vec = self.encoder.encode(["warmup"])[0]
        self.dense(vec, 10, Filters())
        if self.lexical:
            self.lexical.search("warmup", 10)

    def personalize(
        self, query_vec: np.ndarray, history_ids: Sequence[str], event_ids: Sequence[str] = ()
    ) -> tuple[np.ndarray, Personalization]:
        """Blends the mean embedding of known history items into the query vector (the seed's query/user fusion).

        ``history_ids`` come from the request: unknown ones are reported. ``event_ids`` come from the user's
        recorded events: items no longer in the catalog (after a reload) are skipped silently."""
        info = Personalization()
        for item_id in history_ids:
            row = self.catalog.row_of.get(item_id)
            if row is None:
                info.unknown_ids.append(item_id)
            else:
                info.rows.append(row)
        info.rows += [r for r in map(self.catalog.row_of.get, event_ids) if r is not None]
        if not info.rows or self.settings.history_weight <= 0:
            return query_vec, info
        hist = np.asarray(self.embeddings[info.rows], dtype=np.float32).mean(axis=0)
        hist /= max(float(np.linalg.norm(hist)), 1e-12)
        w = self.settings.history_weight
        blended = (1.0 - w) * query_vec + w * hist
        return (blended / max(float(np.linalg.norm(blended)), 1e-12)).astype(np.float32), info

    def _allowed_mask(self, rows: np.ndarray, filters: Filters) -> np.ndarray:
        keep = np.ones(len(rows), dtype=bool)
        cat = self.catalog
        if filters.include_categories:
            codes = [cat.codes_by_name[c] for c in filters.include_categories if c in cat.codes_by_name]
            keep &= np.isin(cat.category_codes[rows], codes)
        if filters.exclude_categories:
            codes = [cat.codes_by_name[c] for c in filters.exclude_categories if c in cat.codes_by_name]
            keep &= ~np.isin(cat.category_codes[rows], codes)
        if filters.max_price is not None:
            prices = cat.prices[rows]
            keep &= np.isnan(prices) | (prices <= filters.max_price)
        if filters.exclude_ids:
            excluded = {cat.row_of[i] for i in filters.exclude_ids if i in cat.row_of}
            if excluded:
                keep &= ~np.isin(rows, list(excluded))
        return keep

    def dense(self, vec: np.ndarray, k: int, filters: Filters, floor: float = -1.0) -> list[Hit]:
        """Top-k items by cosine x quality that pass ``filters`` and have cosine >= ``floor``."""
        n = len(self.catalog)
        cat = self.catalog
        if filters.include_categories:
            codes = [cat.codes_by_name[c] for c in filters.include_categories if c in cat.codes_by_name]
            if not codes:
                return []
            rows = np.flatnonzero(np.isin(cat.category_codes, codes))
            if len(rows) <= BRUTE_FORCE_MAX_ROWS:
                rows = rows[self._allowed_mask(rows, filters)]
                sims = np.asarray(self.embeddings[rows], dtype=np.float32) @ vec
                relevant = sims >= floor
                return self._top(rows[relevant], sims[relevant], k)
        fetch = min(n, max(k, self.settings.anchor_pool))
        while True:
            labels, dists = self.index.knn_query(vec, k=fetch)
            rows = labels[0].astype(np.int64)
            sims = 1.0 - dists[0]
            keep = self._allowed_mask(rows, filters)
            relevant = sims >= floor
            if keep.sum() >= k or fetch >= n or not relevant[-1]:
                keep &= relevant
                return self._top(rows[keep], sims[keep], k)
            fetch = min(n, fetch * 4)

    def _top(self, rows: np.ndarray, sims: np.ndarray, k: int) -> list[Hit]:
        scores = sims * self.catalog.quality[rows]
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(rows[i]), float(scores[i])) for i in order]

    def lexical_hits(self, text: str, k: int, filters: Filters) -> list[Hit]:
        if self.lexical is None:
            raise Unsupported("this artifact has no lexical index; use dense retrieval")
        fetch = k * 4 + len(filters.exclude_ids)
        rows, scores = self.lexical.search(text, fetch)
        keep = self._allowed_mask(rows, filters)
        rows, scores = rows[keep], scores[keep]
        scores = scores * self.catalog.quality[rows]
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(rows[i]), float(scores[i])) for i in order]

    def hybrid(self, vec: np.ndarray, text: str, k: int, filters: Filters, floor: float = -1.0) -> list[Hit]:
        """Fusion of the dense and lexical candidates (:func:`fuse` or :func:`fuse_scores`, as the artifact's
        tuning chose)."""
        pool = max(k, self.settings.anchor_pool)
        dense, lexical = self.dense(vec, pool, filters, floor), self.lexical_hits(text, pool, filters)
        if self.fusion.method == "scores":
            return fuse_scores(self.candidates(vec, text, dense, lexical), self.fusion, k)
        return fuse(dense, lexical, self.fusion, k)

    def candidates(self, vec: np.ndarray, text: str, dense: list[Hit], lexical: list[Hit]) -> Candidates:
        """Exact cosine, BM25 and word coverage for the union of two candidate lists."""
        rows = np.unique(np.fromiter((h.row for h in (*dense, *lexical)), dtype=np.int64))
        cosine = np.asarray(self.embeddings[rows], dtype=np.float32) @ vec
        bm25, coverage = self.lexical.score_rows(text, rows)
        return Candidates(rows, cosine, bm25, coverage, self.catalog.quality[rows])

    def mode_for(self, mode: Mode | None) -> Mode:
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise Unsupported(f"retrieval mode {mode.value} needs a lexical index, which artifact {self.version} lacks")
        return mode

    def retrieve(self, text: str, vec: np.ndarray | None, k: int, filters: Filters, mode: Mode, floor: float = -1.0) -> list[Hit]:
        if mode is Mode.LEXICAL:
            return self.lexical_hits(text, k, filters)
        if mode is Mode.HYBRID:
            return self.hybrid(vec, text, k, filters, floor)
        return self.dense(vec, k, filters, floor)

    def check_tokens(self, text: str, field: str = "query") -> None:
        """INVALID_ARGUMENT when the query is longer than ``max_query_tokens`` encoder tokens."""
        n = self.encoder.count_tokens(text)
        if n > self.settings.max_query_tokens:
            raise InvalidRequest([Violation(field, f"{n} tokens; at most {self.settings.max_query_tokens}")])

    def needs_vector(self, mode: Mode) -> bool:
        return mode is not Mode.LEXICAL

    def search(self, q: SearchQuery, vec: np.ndarray | None) -> list[Hit]:
        return self.retrieve(q.query, vec, q.k, q.filters, self.mode_for(q.mode))

    def recommend(self, q: RecommendQuery, vec: np.ndarray | None) -> list[BundleOut]:
        mode = self.mode_for(q.mode)
        pool = max(self.settings.anchor_pool, q.max_bundles * 2)
        anchors = self.retrieve(q.query, vec, pool, q.filters, mode, self.settings.min_relevance)
        return rank_bundles(
            anchors, self.catalog, self.complements, q.filters, q.max_bundles, q.items_per_bundle,
            self.settings.complement_bonus, self.settings.min_complement_strength,
        )

    def info(self) -> dict[str, Any]:
        return {
            "artifact_version": self.version,
            "model_variant": self.variant,
            "execution_provider": self.encoder.provider,
            "item_count": len(self.catalog),
            "dataset": self.manifest.get("dataset", ""),
            "embedding_dim": self.dim,
            "created_at": self.manifest.get("created_at", ""),
            "modes": self.modes,
            "default_mode": self.default_mode,
        }

