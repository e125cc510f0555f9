"""The loaded artifact and the request pipeline: encode -> retrieve (dense, lexical, hybrid) -> bundle. No gRPC.

An :class:`Engine` is immutable once loaded; a hot reload builds a new one and the runtime swaps it (with its
micro-batcher), so a request that started on one version finishes on it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact as A
from . import tracing
from .bundling import count_affinity, decayed_count, rank_bundles, shopper_affinity
from .catalog import Catalog
from .cross_encoder import Reranker
from .domain import BundleOut, Filters, History, Hit, ItemCount, Mode, Personalization, RecommendQuery, SearchQuery
from .encoder import CUDA, Encoder
from .errors import InvalidRequest, Unsupported, Violation
from .filters import RowFilter
from .fusion import Candidates, Fusion, fuse, fuse_scores, top_hits
from .learned_ranker import LearnedRanker, Prepared, model_path, prepare
from .lexical import Lexical
from .settings import Settings
from .spelling import SpellCorrector
from .vectors import VectorIndex, open_vectors

logger = logging.getLogger(__name__)

# Fusion, fuse and fuse_scores are also importable from here (bundlerec_export.tune did so before the split)
__all__ = ["Engine", "Fusion", "fuse", "fuse_scores", "query_truncate_tokens"]

CPU_PREFERENCE = ("int8_pertoken", "int8", "fp32")
# Probe for batch-exactness at load: each text alone vs all together (varied lengths, so padding differs).
EXACTNESS_PROBE = (
    "milk", "organic baby spinach", "gluten free whole wheat pasta sauce with basil and garlic",
    "买一双好穿的鞋子", "sparkling water 🍋", "dark chocolate", "frozen pizza margherita extra cheese", "eggs",
)
DEFAULT_QUERY_TRUNCATE_TOKENS = 64  # artifacts that record no truncation length


def query_truncate_tokens(manifest: dict[str, Any]) -> int:
    """How many tokens of a query the encoder reads: ``encoder.query_truncate_tokens`` of the manifest
    (``encoder.max_query_tokens`` in artifacts built before the rename)."""
    enc = manifest.get("encoder", {})
    return int(enc.get("query_truncate_tokens", enc.get("max_query_tokens", DEFAULT_QUERY_TRUNCATE_TOKENS)))


@dataclass(frozen=True)
class Offload:
    """Where a load's GIL-heavy work runs (a process pool) and a scratch folder for what it writes."""

    pool: Executor
    scratch: Path


class Engine:
    """One loaded artifact (catalog, vectors, HNSW and BM25 indexes, encoder) and the request pipeline.

    Immutable once loaded: a hot reload builds a new Engine and the runtime swaps the reference.
    """

    def __init__(self, root: Path, settings: Settings, offload: Offload | None = None) -> None:
        """``offload``: a hot reload's child process, which builds the learned ranker's GIL-heavy parts (its title
        evidence, its compiled trees) while this thread loads the rest, so the serving threads keep the GIL."""
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
        prepared: Future[Prepared] | None = None
        speller: Future[SpellCorrector] | None = None
        lexical = (self.root / A.LEXICAL_DIR).is_dir()
        if offload is not None and lexical and settings.spell_correction:
            speller = offload.pool.submit(SpellCorrector, list(self.catalog.titles))
        if offload is not None and m.get("ranker") and lexical:
            prepared = offload.pool.submit(prepare, model_path(self.root, m["ranker"]), list(self.catalog.titles),
                                           settings.ranker_engine, offload.scratch)
        self.complements = A.Complements.read(self.root / A.COMPLEMENTS)
        if len(self.complements.indptr) != len(self.catalog) + 1:
            raise A.ArtifactError(f"{self.root}: complements.npz does not cover {len(self.catalog)} items")
        idx, serving = m.get("index", {}), m.get("serving", {})
        # HNSW ef: the setting, else the one tune chose on judgments for the served ranking (hybrid candidates),
        # else the index's recall-tuned one, which dense-only retrieval (its list is the ranking) keeps as its beam
        recall_ef = settings.ef_search or int(idx.get("ef_search", 64))
        self.ef = settings.ef_search or int(serving.get("ef_search") or recall_ef)
        self.dense_beam = recall_ef if recall_ef > self.ef else 0
        self.vectors: VectorIndex = open_vectors(
            settings.vector_backend, index_path=self.root / A.INDEX, version=self.version, embeddings=self.embeddings,
            catalog=self.catalog, ef=self.ef, anchor_pool=settings.anchor_pool,
        )
        self.lexical: Lexical | None = None
        if lexical:
            titles = self.catalog.titles if settings.spell_correction else None
            self.lexical = Lexical(self.root / A.LEXICAL_DIR, m.get("lexical", {}), titles,
                                   speller.result() if speller is not None else None)
        self.encoder, self.variant = self._load_encoder()
        if self.encoder.dim != self.dim:
            raise A.ArtifactError(f"{self.root}: encoder dimension {self.encoder.dim}, index {self.dim}")
        self.modes = [Mode.DENSE] + ([Mode.LEXICAL, Mode.HYBRID] if self.lexical else [])
        self.fusion = Fusion.from_dict({**serving.get("fusion", {}), **settings.fusion_overrides()})
        self.ranker: LearnedRanker | None = None
        if m.get("ranker") and self.lexical is not None:
            self.ranker = LearnedRanker(self.root, m["ranker"], self.catalog, settings.ranker_engine,
                                        prepared.result() if prepared is not None else None)
        if self.fusion.method == "learned" and self.ranker is None:
            raise A.ArtifactError(f"{self.root}: fusion 'learned' needs a ranker model (and a lexical index), which "
                                  "this artifact lacks; add one with python -m bundlerec_export.train_ranker")
        self.reranker = self._load_reranker()
        self.rerank_default = self.reranker is not None and (
            settings.rerank == "on" or (settings.rerank == "" and bool(serving.get("rerank", False))))
        wanted = settings.retrieval_mode or serving.get("default_retrieval_mode", "dense")
        self.default_mode = Mode(wanted) if Mode(wanted) in self.modes else Mode.DENSE
        logger.info(
            "artifact %s loaded from %s: %d items, dim %d, encoder %s on %s, default retrieval %s, vectors in %s (%.2fs)",
            self.version, self.root, len(self.catalog), self.dim, self.variant, self.encoder.provider,
            self.default_mode.value, self.vectors.describe(), time.perf_counter() - t0,
        )

    def _load_reranker(self) -> Reranker | None:
        """The artifact's cross-encoder unless the ``rerank`` setting is off; refuses ``rerank on`` (or an artifact
        whose tuning turned it on) without one."""
        s, meta = self.settings, self.manifest.get("cross_encoder")
        if not meta:
            if s.rerank == "on" or (s.rerank == "" and self.manifest.get("serving", {}).get("rerank")):
                raise A.ArtifactError(f"{self.root}: re-ranking is on but this artifact has no cross-encoder; add one "
                                      "with python -m bundlerec_export.cross_encoder, or start with --rerank off")
            return None
        if s.rerank == "off":
            return None
        depth = s.rerank_depth or int(meta.get("depth", 30))
        return Reranker(self.root, meta, self.catalog.titles, depth, s.intra_op_threads)

    def _load_encoder(self) -> tuple[Encoder, str]:
        """fp16 on CUDA when a GPU is really usable; otherwise the best CPU graph the artifact has:
        per-token int8, then per-tensor dynamic int8, then fp32. Micro-batching is used only where the load-time
        probe finds the graph batch-exact on this hardware (see batch_exact)."""
        s = self.settings
        truncate_tokens = query_truncate_tokens(self.manifest)
        tok = self.root / A.TOKENIZER
        models = self.manifest.get("models", {})
        if s.model_variant:
            if s.model_variant not in models:
                raise A.ArtifactError(f"{self.root}: no {s.model_variant} graph in this artifact")
            enc = Encoder(self.root / A.MODEL_FILES[s.model_variant], tok, max_length=truncate_tokens, provider=s.provider,
                          intra_op_threads=s.intra_op_threads, fixed_rows=s.max_batch, fixed_rows_on_cuda_only=True)
            return enc, s.model_variant
        if s.provider in ("auto", "cuda") and "fp16" in models:
            enc = Encoder(self.root / A.MODEL_FILES["fp16"], tok, max_length=truncate_tokens, provider=s.provider,
                          intra_op_threads=s.intra_op_threads, fixed_rows=s.max_batch, fixed_rows_on_cuda_only=True)
            if enc.provider == CUDA:
                return enc, "fp16"
            if s.provider == "cuda":
                logger.warning("CUDA execution provider requested but not usable here; serving on CPU")
        variant = next(v for v in CPU_PREFERENCE if v in models)
        enc = Encoder(self.root / A.MODEL_FILES[variant], tok, max_length=truncate_tokens, provider="cpu", intra_op_threads=s.intra_op_threads)
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
        if self.reranker is not None:
            self.reranker.warmup()

    def personalize(
        self, query_vec: np.ndarray, history_ids: Sequence[str], event_ids: Sequence[str] = ()
    ) -> tuple[np.ndarray, Personalization]:
        """Blends the mean embedding of known history items into the query vector (the seed's query/user fusion).

        ``history_ids`` come from the request (``recent_item_ids`` and the items of ``recent_item_counts``):
        unknown ones are reported. ``event_ids`` come from the user's recorded events: items no longer in the
        catalog (after a reload) are skipped silently."""
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

    def allow(self, filters: Filters | RowFilter) -> RowFilter:
        """``filters`` resolved against this catalog (a RowFilter passes through: resolve once per request)."""
        return filters if isinstance(filters, RowFilter) else RowFilter.resolve(filters, self.catalog)

    def _ranked(self, rows: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
        """Top ``k`` of ``rows`` by score x quality."""
        return top_hits(rows, scores * self.catalog.quality[rows], k)

    def dense(self, vec: np.ndarray, k: int, filters: Filters | RowFilter, floor: float = -1.0, beam: int = 0) -> list[Hit]:
        """Top-k items by cosine x quality that pass ``filters`` and have cosine >= ``floor`` (from the vector
        backend: the in-process hnswlib index or a Milvus collection, see :mod:`.vectors`; ``beam``: a wider HNSW
        beam for this search)."""
        return self.vectors.search(vec, k, self.allow(filters), floor, beam)

    def lexical_hits(self, text: str, k: int, filters: Filters | RowFilter) -> list[Hit]:
        if self.lexical is None:
            raise Unsupported("this artifact has no lexical index; use dense retrieval")
        allowed = self.allow(filters)
        fetch = k * 4 + len(allowed.filters.exclude_ids)
        rows, scores = self.lexical.search(text, fetch)
        keep = allowed.anchors(rows)
        return self._ranked(rows[keep], scores[keep], k)

    def hybrid(self, vec: np.ndarray, text: str, k: int, filters: Filters | RowFilter, floor: float = -1.0) -> list[Hit]:
        """Fusion of the dense and lexical candidates (:func:`fuse`, :func:`fuse_scores` or the learned ranker, as
        the artifact's tuning chose or the ``fusion`` setting says)."""
        allowed = self.allow(filters)
        pool = max(k, self.settings.anchor_pool)
        dense, lexical = self.dense(vec, pool, allowed, floor), self.lexical_hits(text, pool, allowed)
        return self.fuse(vec, text, dense, lexical, self.fusion, k)

    def fuse(self, vec: np.ndarray, text: str, dense: list[Hit], lexical: list[Hit], fusion: Fusion, k: int) -> list[Hit]:
        """The top ``k`` of two candidate lists under ``fusion``."""
        if fusion.method == "learned":
            if self.ranker is None or self.lexical is None:
                raise Unsupported("this artifact has no learned ranker")
            return self.ranker.rank(self.lexical, text, self.candidates(vec, text, dense, lexical), dense, lexical, k,
                                   prefilter=Fusion("scores", alpha=fusion.alpha, coverage=fusion.coverage))
        if fusion.method == "scores":
            return fuse_scores(self.candidates(vec, text, dense, lexical), fusion, k)
        return fuse(dense, lexical, fusion, k)

    def candidates(self, vec: np.ndarray, text: str, dense: list[Hit], lexical: list[Hit]) -> Candidates:
        """Exact cosine, BM25 and word coverage for the union of two candidate lists."""
        if self.lexical is None:
            raise Unsupported("this artifact has no lexical index; use dense retrieval")
        rows = np.unique(np.fromiter((h.row for h in (*dense, *lexical)), dtype=np.int64))
        cosine = np.asarray(self.embeddings[rows], dtype=np.float32) @ vec
        bm25, coverage = self.lexical.score_rows(text, rows)
        return Candidates(rows, cosine, bm25, coverage, self.catalog.quality[rows])

    def mode_for(self, mode: Mode | None) -> Mode:
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise Unsupported(f"retrieval mode {mode.value} needs a lexical index, which artifact {self.version} lacks")
        return mode

    def retrieve(self, text: str, vec: np.ndarray | None, k: int, allowed: RowFilter, mode: Mode,
                 floor: float = -1.0) -> list[Hit]:
        if mode is Mode.LEXICAL:
            return self.lexical_hits(text, k, allowed)
        if vec is None:
            raise ValueError(f"{mode.value} retrieval needs the query vector")
        if mode is Mode.HYBRID:
            return self.hybrid(vec, text, k, allowed, floor)
        return self.dense(vec, k, allowed, floor, self.dense_beam)  # the list is the ranking: the recall-tuned beam

    def check_tokens(self, text: str, field: str = "query") -> None:
        """INVALID_ARGUMENT when the query is longer than the ``max_query_tokens`` setting (the request limit;
        the encoder itself reads the first ``query_truncate_tokens`` of the manifest)."""
        n = self.encoder.count_tokens(text)
        if n > self.settings.max_query_tokens:
            raise InvalidRequest([Violation(field, f"{n} tokens; at most {self.settings.max_query_tokens}")])

    def needs_vector(self, mode: Mode) -> bool:
        return mode is not Mode.LEXICAL

    def wants_rerank(self, asked: bool | None, recommend: bool = False) -> bool:
        """Whether a call re-ranks: what it asked (``None``: the server default; for Recommend only with
        ``rerank_recommend``). Asking for it where no cross-encoder is loaded is refused."""
        if asked and self.reranker is None:
            raise Unsupported("this server has no cross-encoder re-ranking stage (the artifact has none, or it was "
                              "started with --rerank off)")
        if asked is None:
            return self.rerank_default and (not recommend or self.settings.rerank_recommend)
        return asked

    def search(self, q: SearchQuery, vec: np.ndarray | None, depth: int = 0) -> list[Hit]:
        """The top ``max(k, depth)`` hits (``depth``: what a re-ranking stage will look at)."""
        return self.retrieve(q.query, vec, max(q.k, depth), self.allow(q.filters), self.mode_for(q.mode))

    def affinity(self, q: RecommendQuery, history: History, now_ms: int) -> tuple[dict[int, float], float]:
        """A known shopper's affinity per catalog row and its mix weight: recency-decayed purchase counts (the
        request's ``recent_item_counts``, else the recorded ones; ``personal_weight``) when any is in the
        catalog, else the position-decayed presence of ``recent_item_ids`` and the recorded recent items
        (``presence_weight``). Empty for an unknown shopper."""
        rows_of = self.catalog.row_of.get
        counts: Sequence[ItemCount] = q.recent_item_counts or history.counts
        hl = self.settings.count_half_life_days
        personal = count_affinity(
            (row, decayed_count(c.count, c.first_ms, c.last_ms, now_ms, hl))
            for c in counts if (row := rows_of(c.item_id)) is not None
        )
        if personal:
            return personal, self.settings.personal_weight
        return shopper_affinity([r for r in map(rows_of, q.recent_item_ids) if r is not None],
                                [r for r in map(rows_of, history.recent) if r is not None]), self.settings.presence_weight

    def recommend(self, q: RecommendQuery, vec: np.ndarray | None, history: History = History(),
                  now_ms: int | None = None) -> list[BundleOut]:
        """Anchors retrieved under the request's filters, then bundled under the same (resolved once); a known
        shopper's history (:meth:`affinity`: the request's and the recorded one) makes the complements
        repeat-aware."""
        allowed = self.allow(q.filters)
        return self.bundle(q, self.anchors(q, vec, allowed), allowed, history, now_ms)

    def anchors(self, q: RecommendQuery, vec: np.ndarray | None, allowed: RowFilter) -> list[Hit]:
        """Recommend's anchor candidates, best first."""
        pool = max(self.settings.anchor_pool, q.max_bundles * 2)
        with tracing.span("retrieve"):
            return self.retrieve(q.query, vec, pool, allowed, self.mode_for(q.mode), self.settings.min_relevance)

    def bundle(self, q: RecommendQuery, anchors: list[Hit], allowed: RowFilter, history: History = History(),
               now_ms: int | None = None) -> list[BundleOut]:
        """Bundles around ``anchors`` (see :meth:`recommend`)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with tracing.span("bundle"):
            personal, weight = self.affinity(q, history, now_ms)
            return rank_bundles(
                anchors, self.catalog, self.complements, allowed, q.max_bundles, q.items_per_bundle,
                self.settings.complement_bonus, self.settings.min_complement_strength, personal=personal or None,
                personal_weight=weight,
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

