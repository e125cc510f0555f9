"""Trains the optional re-ranking cross-encoder of an artifact (MiniLM, query and title in one input, a fresh
1-logit head) on graded relevance judgments, on CPU, and ships it as int8 ONNX.

* Candidates exactly as served: the artifact's own engine (served retrieval mode and fusion, default settings)
  returns the top ``depth`` hits of each query: what the server's re-ranking stage sees.
* Training: TRAIN split of ``evaluation.split_of`` (a deterministic subsample of ``max_train_queries``). One
  group per query and epoch: the judged products among its candidates, up to ``outside_positives`` judged
  products the retrieval missed, and ``unjudged_negatives`` unjudged candidates of the served top (hard
  negatives, gain 0), at most ``group`` pairs. Listwise loss (ListNet): cross entropy between softmax(logits) and the target ∝ 2^gain − 1,
  gain = relevance − 1 (the evaluation's). AdamW, linear warm-up and decay, seeded.
* Checkpoints scored on a fixed subsample of DEV (NDCG@10 of the re-ranked served top); the best is kept. Then the
  export (``cross_encoder/fp32.onnx`` by Optimum, ``cross_encoder/int8_pertoken.onnx`` by
  :mod:`.pertoken`, batch-exact, checked) is scored through the serving :class:`CrossEncoder` on ALL dev queries,
  where the blend weight with the retrieval score is chosen; TEST is never read.
* ``manifest["cross_encoder"]``: files, settings, dev figures (served ranking vs re-ranked), training log summary;
  ``manifest["serving"]["rerank"]``: true only when the re-ranked dev NDCG@10 beats the served ranking's by
  ``min_gain`` (1 %: dev chose the blend, and the stage costs tens of milliseconds a query).
* The trained model is cached in ``<artifact>.work/cross-encoder-<key>`` (key: settings, base model, candidates
  and labels), so a rebuild only exports and scores.

    python -m bundlerec_export.cross_encoder --artifact artifacts/homedepot --judgments ../shared/data/homedepot/judgments.csv
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import folders
from .config import to_json
from .evaluation import aggregate, query_metrics, read_judgments, split_of
from .offline import ensure_offline

if TYPE_CHECKING:
    from bundlerec_server.engine import Engine

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.json"
BLENDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class CrossEncoderConfig:
    depth: int = 30  # served top re-ranked (and the candidates trained on)
    max_length: int = 48  # tokens of a pair, truncated longest-first
    max_train_queries: int = 3000  # a deterministic subsample of the train split (0: all)
    group: int = 8  # pairs per query per step
    batch_groups: int = 4  # queries per optimizer step
    outside_positives: int = 4  # judged products outside the served top added to a group
    unjudged_negatives: int = 2  # unjudged products of the served top in a group (gain 0)
    epochs: int = 1
    lr: float = 5e-5
    head_lr: float = 1e-3  # the pooler and the 1-logit classifier (fresh or re-initialised)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    checkpoints: int = 3  # dev evaluations over the training (the best is kept)
    dev_select_queries: int = 400  # dev queries for checkpoint selection (all dev queries for the final figures)
    min_gain: float = 0.01  # on by default only when the re-ranked dev NDCG@10 beats the served one by this share
    seed: int = 0
    threads: int = 2
    base_model: Path | None = None  # default: the packaged all-MiniLM-L6-v2
    progress: bool = True

    def training_dict(self) -> dict[str, Any]:
        """Everything that changes the trained weights (the cache key); not progress or the serving choice."""
        d: dict[str, Any] = to_json(asdict(self))
        d.pop("progress")
        d.pop("min_gain")
        return d


@dataclass
class Candidates:
    """One split's queries, their served top ``depth`` (catalog rows and retrieval scores) and judgments."""

    queries: list[str] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    judged: list[dict[str, float]] = field(default_factory=list)

    def subset(self, idx: Sequence[int]) -> Candidates:
        return Candidates([self.queries[i] for i in idx], [self.rows[i] for i in idx], [self.scores[i] for i in idx],
                          [self.judged[i] for i in idx])


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def served_engine(artifact: Path) -> Engine:
    """The artifact's engine with the server's default settings (anchor pool, fusion, mode): served candidates."""
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    return Engine(artifact, Settings(artifact=artifact, provider="cpu", verify_checksums=False, rerank="off"))


def collect(engine: Engine, judged: dict[str, dict[str, float]], queries: Sequence[str], depth: int,
            progress: bool = False, desc: str = "candidates") -> Candidates:
    """The served top ``depth`` of each query (as the Search RPC returns it before re-ranking)."""
    from bundlerec_server.domain import SearchQuery

    it: Any = queries
    if progress:
        from tqdm import tqdm

        it = tqdm(queries, desc=desc, unit="query")
    out = Candidates()
    for q in it:
        vec = engine.encoder.encode([q])[0]
        hits = engine.search(SearchQuery(q, k=depth), vec)
        out.queries.append(q)
        out.rows.append([h.row for h in hits])
        out.scores.append(np.array([h.score for h in hits], dtype=np.float64))
        out.judged.append(judged[q])
    return out


def _digest(*sets: Candidates, ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in sets:
        for q, rows, j in zip(c.queries, c.rows, c.judged, strict=True):
            h.update(json.dumps([q, [ids[r] for r in rows], sorted(j.items())]).encode())
    return h.hexdigest()


def metrics_of(c: Candidates, ids: Sequence[str], orders: Sequence[np.ndarray] | None = None, k: int = 10) -> dict[str, Any]:
    """NDCG/Recall/MRR@k of each query's candidates in ``orders`` (None: the served order)."""
    per = []
    for i, (rows, j) in enumerate(zip(c.rows, c.judged, strict=True)):
        order = orders[i] if orders is not None else np.arange(len(rows))
        per.append(query_metrics([ids[rows[int(p)]] for p in order], j, k))
    return dict(aggregate(per))


def blend_orders(c: Candidates, logits: Sequence[np.ndarray], blend: float) -> list[np.ndarray]:
    from bundlerec_server.cross_encoder import rerank_order

    return [rerank_order(lg, s, blend) if len(lg) > 1 else np.arange(len(lg)) for lg, s in zip(logits, c.scores, strict=True)]


# ----------------------------------------------------------------------------------------------- training


@dataclass
class Group:
    query: str
    titles: list[str]
    gains: list[float]


def _gain(rel: float) -> float:
    return max(0.0, float(rel) - 1.0)


def make_groups(c: Candidates, ids: Sequence[str], titles: Sequence[str], row_of: dict[str, int],
                cfg: CrossEncoderConfig, rng: random.Random) -> list[Group]:
    """One shuffled group per training query: its judged products (those in the served top first, then others),
    and ``unjudged_negatives`` unjudged products of the served top; kept when a pair has gain > 0."""
    out = []
    for q, rows, judged in zip(c.queries, c.rows, c.judged, strict=True):
        top = [ids[r] for r in rows]
        in_top = set(top)
        inside = [p for p in top if p in judged]
        outside = sorted(p for p in judged if p not in in_top and p in row_of)
        rng.shuffle(outside)
        negatives = [p for p in top if p not in judged]
        n_neg = min(cfg.unjudged_negatives, len(negatives), cfg.group - 1)
        chosen = (inside + outside[: cfg.outside_positives])[: cfg.group - n_neg]
        chosen += rng.sample(negatives, n_neg)
        gains = [_gain(judged.get(p, 1.0)) for p in chosen]
        if len(chosen) < 2 or max(gains) <= 0:
            continue
        out.append(Group(q, [titles[row_of[p]] for p in chosen], gains))
    rng.shuffle(out)
    return out


def listnet_loss(logits: Any, gains: Any, sizes: Sequence[int]) -> Any:
    """Mean over groups of CE(softmax(target ∝ 2^gain − 1), softmax(logits))."""
    import torch

    losses = []
    start = 0
    for n in sizes:
        lg, g = logits[start:start + n], gains[start:start + n]
        target = torch.pow(2.0, g) - 1.0
        target = target / target.sum()
        losses.append(-(target * torch.log_softmax(lg, dim=0)).sum())
        start += n
    return torch.stack(losses).mean()


def torch_logits(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> Any:
    import torch

    from bundlerec_server.cross_encoder import pair_arrays

    ids, mask, types = pair_arrays(tokenizer, pairs)
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                token_type_ids=torch.from_numpy(types))
    return out.logits.reshape(-1)


def score_torch(model: Any, tokenizer: Any, c: Candidates, titles: Sequence[str]) -> list[np.ndarray]:
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for q, rows in zip(c.queries, c.rows, strict=True):
            out.append(torch_logits(model, tokenizer, [(q, titles[r]) for r in rows]).float().numpy()
                       if rows else np.zeros(0, dtype=np.float32))
    model.train()
    return out


def train_model(train: Candidates, dev: Candidates, ids: Sequence[str], titles: Sequence[str], cfg: CrossEncoderConfig,
                out: Path, tokenizer_file: Path) -> dict[str, Any]:
    """Trains from the base model with a fresh 1-logit head, keeps the best dev checkpoint, saves an HF folder
    into ``out``; returns the training log."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from bundlerec_server.cross_encoder import pair_tokenizer

    base = cfg.base_model or _default_base_model()
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or prev_threads)
    try:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized: classifier" is the point
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
        hf_logging.set_verbosity(verbosity)
        pooler = getattr(getattr(model, "bert", None), "pooler", None)
        if pooler is not None:  # the bi-encoder never trained its pooler (outputs ~0.05): start from tanh([CLS])
            with torch.no_grad():
                pooler.dense.weight.copy_(torch.eye(pooler.dense.weight.shape[0]))
                pooler.dense.bias.zero_()
        model.train()
        tok = pair_tokenizer(tokenizer_file, cfg.max_length)
        row_of = {p: i for i, p in enumerate(ids)}
        rng = random.Random(cfg.seed)
        epochs = [make_groups(train, ids, titles, row_of, cfg, rng) for _ in range(cfg.epochs)]
        steps_per_epoch = math.ceil(len(epochs[0]) / cfg.batch_groups)
        total = steps_per_epoch * cfg.epochs
        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        head = ("pooler.", "classifier.")
        params = [
            {"params": [p for n, p in model.named_parameters() if not any(k in n for k in (*no_decay, *head))],
             "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay) and
                        not any(k in n for k in head)], "weight_decay": 0.0},
            {"params": [p for n, p in model.named_parameters() if any(k in n for k in head)], "weight_decay": 0.0,
             "lr": cfg.head_lr},
        ]
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        warm = max(1, int(round(total * cfg.warmup_ratio)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr(total, warm))
        check_at = {int(round(total * (i + 1) / cfg.checkpoints)) for i in range(cfg.checkpoints)}
        baseline = metrics_of(dev, ids)
        log: dict[str, Any] = {"steps": total, "groups_per_epoch": len(epochs[0]), "loss": [], "checkpoints": [],
                               "dev_select": {"queries": len(dev.queries), "served": _round(baseline)}}
        best: tuple[float, int, dict[str, Any]] | None = None
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="cross-encoder", unit="step")
        step = 0
        t_eval = 0.0
        for groups in epochs:
            for s in range(0, len(groups), cfg.batch_groups):
                batch = groups[s:s + cfg.batch_groups]
                pairs = [(g.query, t) for g in batch for t in g.titles]
                gains = torch.tensor([x for g in batch for x in g.gains], dtype=torch.float32)
                loss = listnet_loss(torch_logits(model, tok, pairs), gains, [len(g.titles) for g in batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                log["loss"].append(round(float(loss.detach()), 5))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(np.mean(log['loss'][-50:])):.3f}")
                if step in check_at:
                    te = time.perf_counter()
                    m = metrics_of(dev, ids, blend_orders(dev, score_torch(model, tok, dev, titles), 0.0))
                    t_eval += time.perf_counter() - te
                    log["checkpoints"].append({"step": step, "dev_select": _round(m)})
                    msg = (f"cross-encoder step {step}/{total}: dev NDCG@10 {m['ndcg']:.4f} re-ranked "
                           f"(served {baseline['ndcg']:.4f})")
                    (bar.write(msg) if bar is not None else logger.info(msg))
                    if best is None or (m["ndcg"] or 0.0) > best[0]:
                        best = ((m["ndcg"] or 0.0), step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if bar is not None:
            bar.close()
        assert best is not None
        model.load_state_dict(best[2])
        model.eval()
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        log.update({"best_step": best[1], "base_model": str(base), "config": cfg.training_dict(),
                    "seconds": {"total": round(time.perf_counter() - t0, 1), "dev_eval": round(t_eval, 1)},
                    "threads": cfg.threads or prev_threads, "torch": torch.__version__})
    finally:
        torch.set_num_threads(prev_threads)
    return log


def _lr(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _default_base_model() -> Path:
    from .onnx_export import default_base_model

    return default_base_model()


# ----------------------------------------------------------------------------------------------- export


def export_onnx(model_dir: Path, root: Path) -> dict[str, Any]:
    """``cross_encoder/fp32.onnx`` (Optimum, text-classification), ``int8_pertoken.onnx`` and ``tokenizer.json``
    into the artifact ``root``; fails unless the int8 graph is batch-exact. Returns the ``files`` entry."""
    from optimum.exporters.onnx import main_export

    from bundlerec_server.cross_encoder import CROSS_ENCODER_FILES, CROSS_ENCODER_TOKENIZER, CrossEncoder

    from .onnx_export import ExportError
    from .pertoken import quantize_per_token

    fp32, int8 = root / CROSS_ENCODER_FILES["fp32"], root / CROSS_ENCODER_FILES["int8_pertoken"]
    fp32.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".optimum-") as tmp:
        main_export(model_name_or_path=str(model_dir), output=tmp, task="text-classification",
                    library_name="transformers", local_files_only=True, do_validation=False)
        produced = Path(tmp) / "model.onnx"
        if not produced.is_file():
            raise ExportError(f"main_export wrote no model.onnx for the cross-encoder into {tmp}")
        shutil.move(str(produced), fp32)
    quantize_per_token(fp32, int8)
    shutil.copyfile(model_dir / "tokenizer.json", root / CROSS_ENCODER_TOKENIZER)
    enc = CrossEncoder(int8, root / CROSS_ENCODER_TOKENIZER)
    if not enc.probe_batch_exact():
        raise ExportError(f"{int8}: the per-token int8 cross-encoder is not batch-exact on this machine")
    return {name: path for name, path in CROSS_ENCODER_FILES.items()}


def onnx_logits(root: Path, variant: str, c: Candidates, titles: Sequence[str], max_length: int,
                progress: bool = False) -> list[np.ndarray]:
    """Logits of every query's candidates through the serving :class:`CrossEncoder` (one run per query, as served)."""
    from bundlerec_server.cross_encoder import CROSS_ENCODER_FILES, CROSS_ENCODER_TOKENIZER, CrossEncoder

    enc = CrossEncoder(root / CROSS_ENCODER_FILES[variant], root / CROSS_ENCODER_TOKENIZER, max_length=max_length,
                       intra_op_threads=0)
    it: Any = zip(c.queries, c.rows, strict=True)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(c.queries), desc=f"dev ({variant})", unit="query")
    return [enc.logits(q, [titles[r] for r in rows]) for q, rows in it]


# ----------------------------------------------------------------------------------------------- driver


def train_and_ship(root: Path, engine: Engine, judgments: Path, cfg: CrossEncoderConfig, cache: Path,
                   model: Path | None = None) -> dict[str, Any]:
    """Candidates from ``engine`` (the artifact in ``root``), the trained model (cached in ``cache``; or ``model``,
    a folder this module trained for another artifact), its export into ``root`` and its dev figures; returns the
    manifest's ``cross_encoder`` entry."""
    ensure_offline()
    t0 = time.perf_counter()
    judged = read_judgments(judgments)
    split = {q: split_of(q) for q in judged}
    train_q = sorted(q for q in judged if split[q] == "train")
    if cfg.max_train_queries:
        train_q = sorted(sorted(train_q, key=_hash)[: cfg.max_train_queries])
    dev_q = sorted(q for q in judged if split[q] == "dev")
    if not train_q or not dev_q:
        raise ValueError(f"{judgments}: the cross-encoder needs train and dev queries")
    ids, titles = engine.catalog.ids, engine.catalog.titles
    train = collect(engine, judged, train_q, cfg.depth, cfg.progress, "train candidates")
    dev = collect(engine, judged, dev_q, cfg.depth, cfg.progress, "dev candidates")
    t_collect = time.perf_counter() - t0
    select = dev.subset(sorted(sorted(range(len(dev.queries)), key=lambda i: _hash(dev.queries[i]))[: cfg.dev_select_queries]))
    base = cfg.base_model or _default_base_model()
    from .finetune import _model_digest

    key_src = {"config": cfg.training_dict(), "base": _model_digest(base), "data": _digest(train, select, ids=ids)}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(model) if model is not None else cache / f"cross-encoder-{key}"
    cached = (folder / LOG_FILE).is_file() and (folder / "config.json").is_file()
    if model is not None and not cached:
        raise ValueError(f"{model}: not a cross-encoder folder of this module (no {LOG_FILE} or config.json)")
    if cached:
        logger.info("cross-encoder reused from %s", folder)
        log = json.loads((folder / LOG_FILE).read_text())
    else:
        with folders.filled(folder, f".cross-encoder-{key}-") as work:
            log = train_model(train, select, ids, titles, cfg, work, Path(base) / "tokenizer.json")
            (work / LOG_FILE).write_text(json.dumps(log, indent=1))
    t_export = time.perf_counter()
    files = export_onnx(folder, root)
    t_export = time.perf_counter() - t_export
    t_dev = time.perf_counter()
    logits = onnx_logits(root, "int8_pertoken", dev, titles, cfg.max_length, cfg.progress)
    served = metrics_of(dev, ids)
    blends = {b: metrics_of(dev, ids, blend_orders(dev, logits, b)) for b in BLENDS}
    blend = max(BLENDS, key=lambda b: (blends[b]["ndcg"] or 0.0, -b))
    n_agree = min(200, len(select.queries))
    agree = select.subset(range(n_agree))
    l32 = onnx_logits(root, "fp32", agree, titles, cfg.max_length)
    l8 = onnx_logits(root, "int8_pertoken", agree, titles, cfg.max_length)
    diffs = np.concatenate([np.abs(a - b) for a, b in zip(l32, l8, strict=True)])
    ndcg32 = metrics_of(agree, ids, blend_orders(agree, l32, 0.0))["ndcg"]
    ndcg8 = metrics_of(agree, ids, blend_orders(agree, l8, 0.0))["ndcg"]
    t_dev = time.perf_counter() - t_dev
    wins = (blends[blend]["ndcg"] or 0.0) > (served["ndcg"] or 0.0) * (1.0 + cfg.min_gain)
    logger.info("cross-encoder on %d dev queries: NDCG@10 %.4f re-ranked (blend %.1f) vs %.4f served: %s",
                len(dev.queries), blends[blend]["ndcg"] or 0.0, blend, served["ndcg"] or 0.0,
                "on by default" if wins else "off by default")
    from bundlerec_server.cross_encoder import CROSS_ENCODER_TOKENIZER, SERVED_VARIANT

    return {
        "files": files, "tokenizer": CROSS_ENCODER_TOKENIZER, "served_variant": SERVED_VARIANT,
        "max_length": cfg.max_length, "depth": cfg.depth, "blend": blend, "wins_on_dev": wins,
        "input": "[CLS] query [SEP] title [SEP], truncated longest-first", "head": "fresh 1-logit (BertForSequenceClassification)",
        "base_model": str(base), "batch_exact": True,
        "dev": {"queries": len(dev.queries), "candidates": f"served top {cfg.depth} (default settings, artifact's mode and fusion)",
                "served": _round(served), "reranked": _round(blends[blend]),
                "ndcg_by_blend": {str(b): round(m["ndcg"] or 0.0, 4) for b, m in blends.items()},
                "note": "dev chose the checkpoint (on a subsample) and the blend: a mild optimism"},
        "int8_vs_fp32": {"queries": n_agree, "mean_abs_logit_diff": round(float(diffs.mean()), 5),
                         "max_abs_logit_diff": round(float(diffs.max()), 5),
                         "ndcg_fp32": round(ndcg32 or 0.0, 4), "ndcg_int8": round(ndcg8 or 0.0, 4)},
        "training": {"split": "train", "queries": len(train.queries), "groups": log["groups_per_epoch"],
                     "steps": log["steps"], "best_step": log["best_step"], "checkpoints": log["checkpoints"],
                     "settings": log["config"], "loss": "ListNet (target softmax ∝ 2^gain - 1), gain = relevance - 1",
                     "final_loss": float(np.mean(log["loss"][-50:])) if log["loss"] else None,
                     "seconds": log["seconds"], "reused_from_cache": cached,
                     "cache_key": key if model is None else None, "model_from": str(model) if model is not None else None},
        "seconds": {"candidates": round(t_collect, 1), "export": round(t_export, 1), "dev": round(t_dev, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }


def cross_encoder_part(root: Path, engine: Engine, judgments: Path, cfg: CrossEncoderConfig, cache: Path,
                       model: Path | None = None) -> dict[str, Any]:
    """The manifest parts: ``cross_encoder`` and ``serving.rerank`` (on when it wins on dev)."""
    entry = train_and_ship(root, engine, judgments, cfg, cache, model)
    return {"cross_encoder": entry, "serving": {"rerank": bool(entry["wins_on_dev"])}}


def add_cross_encoder(artifact: Path, judgments: Path, cfg: CrossEncoderConfig, cache: Path | None = None,
                      model: Path | None = None) -> dict[str, Any]:
    """Trains (or takes ``model``) and ships a cross-encoder for an existing artifact and rewrites its manifest
    (checksums included)."""
    from bundlerec_server import artifact as A

    artifact = Path(artifact).resolve()
    manifest = A.read_manifest(artifact, verify=False)
    cache = cache or artifact.parent / f"{artifact.name}.work"
    part = cross_encoder_part(artifact, served_engine(artifact), judgments, cfg, cache, model)
    manifest["cross_encoder"] = part["cross_encoder"]
    manifest.setdefault("serving", {})["rerank"] = part["serving"]["rerank"]
    manifest.pop("files", None)
    manifest.pop("format_version", None)
    A.write_manifest(artifact, manifest)
    return part["cross_encoder"]


def main(argv: list[str] | None = None) -> int:
    d = CrossEncoderConfig()
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.cross_encoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--cache", type=Path, help="folder of cached trained models (default <artifact>.work)")
    p.add_argument("--model", type=Path, help="ship this trained folder (cross-encoder-<key> of another artifact's "
                                              "cache) instead of training; dev figures are measured on this artifact")
    for name in ("depth", "max_length", "max_train_queries", "group", "batch_groups", "outside_positives", "epochs",
                 "lr", "head_lr", "unjudged_negatives", "checkpoints", "min_gain", "dev_select_queries", "seed", "threads"):
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ensure_offline()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bundlerec_export", "bundlerec_server"):
        logging.getLogger(name).setLevel(logging.INFO)
    kw = {k: v for k, v in vars(args).items() if k not in ("artifact", "judgments", "cache", "model", "no_progress")}
    entry = add_cross_encoder(args.artifact, args.judgments, CrossEncoderConfig(**kw, progress=not args.no_progress),
                              args.cache, args.model)
    print(json.dumps({k: entry[k] for k in ("depth", "blend", "wins_on_dev", "dev", "int8_vs_fp32", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
