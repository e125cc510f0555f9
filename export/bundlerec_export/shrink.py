"""A shallower query/title encoder: a BERT student keeping some of the teacher's layers, distilled on its vectors.

The student is the teacher (a local Hugging Face BERT folder, e.g. the build's fine-tuned checkpoint) with only
the listed transformer layers kept (embeddings, tokenizer and the kept layers copied), then trained so that its
mean-pooled, L2-normalised embedding matches the teacher's (loss: 1 - cosine). Training texts: the artifact's
catalog titles (targets: the artifact's own ``embeddings.npy``, the teacher's fp32 vectors, rows in
``items.jsonl`` order) and the TRAIN-split queries of the judgments (targets: the teacher encoded in torch, same
pooling); dev and test queries are never read. The result is a Hugging Face folder for
``bundlerec-export --base-model``. Measured in ``docs/performance.md`` ("A 3-layer encoder (measured)").

The build does the same in one command (``bundlerec-export --student-layers 0,2,4``, :func:`student_for_build`):
the targets are then the teacher's own torch vectors (titles at the serving 128 tokens, queries at 64), the
student is cached in ``<out>.work/student-<key>``, and a fine-tuned teacher's student gets a short fine-tune on
the same judgments.

    python -m bundlerec_export.shrink --teacher artifacts/homedepot.work/finetuned-df2034eba1e38ab0 \\
        --layers 0,2,4 --artifact artifacts/homedepot --judgments ../shared/data/homedepot/judgments.csv \\
        --out runs/student-l3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import folders
from .evaluation import read_judgments, train_queries
from .finetune import _lr_lambda, embed, embed_many, load_model
from .offline import ensure_offline
from .tiny import TOKENIZER_FILES

__all__ = ["DistillSettings", "Student", "distill", "make_student", "main", "student_for_build", "train_student"]

logger = logging.getLogger(__name__)

QUERY_TOKENS = 64  # the server's query truncation (manifest encoder.query_truncate_tokens)
LOG_FILE = "shrink_log.json"


@dataclass
class DistillSettings:
    epochs: int = 5  # Home Depot: 3 lost 1.3 % dev NDCG@10 of the served hybrid, 5 lost 0.7 % (docs/performance.md)
    batch_size: int = 64
    lr: float = 3e-4
    warmup: float = 0.05  # fraction of the steps
    max_length: int = 48  # training truncation (titles and queries); targets were made at the serving lengths
    holdout: int = 1000  # titles kept aside for the validation cosine
    seed: int = 0
    threads: int = 2
    freeze_word_embeddings: bool = True  # the teacher's vocabulary table stays (fewer weights to update a step)


def make_student(teacher: str | Path, layers: Sequence[int], out: str | Path) -> Path:
    """Writes a BertModel with the teacher's embeddings and its ``layers`` (in that order) plus the tokenizer
    files into ``out``; returns ``out``."""
    ensure_offline()
    from transformers import AutoModel

    src, dst = Path(teacher), Path(out)
    model = AutoModel.from_pretrained(str(src), local_files_only=True)
    n = model.config.num_hidden_layers
    if not layers or any(i < 0 or i >= n for i in layers):
        raise ValueError(f"layers {list(layers)}: each must be in 0..{n - 1}")
    model.encoder.layer = type(model.encoder.layer)([model.encoder.layer[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches (little padding) in random order: shuffle, sort within chunks of 50 batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    out: list[list[int]] = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: lengths[i])
        out.extend(part[b:b + batch_size] for b in range(0, len(part), batch_size))
    rng.shuffle(out)
    return out


def cosine_to(model: Any, tok: Any, texts: Sequence[str], targets: np.ndarray, max_length: int,
              batch_size: int = 128) -> float:
    """Mean cosine between the model's embeddings of ``texts`` and the unit ``targets`` rows."""
    if not texts:
        return float("nan")
    e = embed_many(model, tok, texts, max_length, batch_size)
    return float(np.mean(np.sum(e * targets, axis=1)))


def distill(model: Any, tok: Any, texts: Sequence[str], targets: np.ndarray, settings: DistillSettings,
            progress: bool = True, val: tuple[Sequence[str], np.ndarray] | None = None) -> dict[str, Any]:
    """Trains ``model`` in place so that its embeddings of ``texts`` match the unit rows of ``targets``
    (loss 1 - cosine; AdamW, linear warm-up and decay). Returns the log: per-epoch mean loss, validation cosine."""
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    lengths = [len(t) for t in texts]
    per_epoch = (len(texts) + settings.batch_size - 1) // settings.batch_size
    total = per_epoch * settings.epochs
    if settings.freeze_word_embeddings:
        model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(total * settings.warmup))))
    target = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    log: dict[str, Any] = {"epochs": [], "steps": total}
    if val is not None:
        log["val_cosine_start"] = cosine_to(model, tok, val[0], val[1], settings.max_length)
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        losses: list[float] = []
        batches = _batches(lengths, settings.batch_size, rng)
        it: Any = batches
        if progress:
            from tqdm import tqdm

            it = tqdm(batches, desc=f"distil epoch {epoch + 1}", unit="batch")
        for rows in it:
            e = embed(model, tok, [texts[i] for i in rows], settings.max_length)
            loss = (1.0 - (e * target[rows]).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress and len(losses) % 20 == 0:
                it.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "last_loss": losses[-1]}
        if val is not None:
            entry["val_cosine"] = cosine_to(model, tok, val[0], val[1], settings.max_length)
        log["epochs"].append(entry)
        logger.info("epoch %d: %s", epoch + 1, entry)
    model.eval()
    log["seconds"] = round(time.perf_counter() - t0, 1)
    return log


def train_student(teacher: Path, layers: Sequence[int], titles: Sequence[str], title_targets: np.ndarray,
                  queries: Sequence[str], query_targets: np.ndarray, settings: DistillSettings, out: Path,
                  progress: bool = True, init: Path | None = None) -> dict[str, Any]:
    """Makes the student of ``teacher`` (or continues ``init``'s) in ``out``, distils it on the titles (minus a
    held-out sample, the validation cosine) and queries with their teacher vectors, saves it; returns the log."""
    rng = np.random.default_rng(settings.seed)
    hold = set(rng.choice(len(titles), size=min(settings.holdout, len(titles) // 10), replace=False).tolist())
    val_titles = [t for i, t in enumerate(titles) if i in hold]
    val_targets = title_targets[sorted(hold)]
    keep = [i for i in range(len(titles)) if i not in hold]
    texts = [titles[i] for i in keep] + list(queries)
    all_targets = np.concatenate([title_targets[keep], query_targets]).astype(np.float32)
    if init is not None:  # more epochs on an earlier student (a new warm-up and decay)
        shutil.copytree(init, out, dirs_exist_ok=True)
    else:
        make_student(teacher, layers, out)
    tok, student = load_model(out)
    logger.info("student: layers %s of %s, %d titles + %d other texts", list(layers), teacher, len(keep), len(queries))
    log = distill(student, tok, texts, all_targets, settings, progress=progress, val=(val_titles, val_targets))
    student.save_pretrained(out, safe_serialization=True)
    log.update(teacher=str(teacher), init=str(init) if init else None, layers=list(layers), titles=len(keep),
               train_queries=len(queries), holdout_titles=len(val_titles), settings=asdict(settings))
    return log


@dataclass
class Student:
    path: Path  # HF model folder
    teacher: Path
    log: dict[str, Any]
    cached: bool


def student_for_build(teacher: Path, layers: Sequence[int], titles: Sequence[str], queries: Sequence[str],
                      settings: DistillSettings, cache: Path, item_tokens: int, progress: bool = True) -> Student:
    """The build's student (cached in ``cache/student-<key>``; key: teacher weights, layers, settings, texts):
    targets are the teacher's vectors of the titles at ``item_tokens`` and of ``queries`` at the query length."""
    from .finetune import _model_digest

    key_src = {"teacher": _model_digest(teacher), "layers": list(layers), "settings": asdict(settings),
               "titles": _texts_digest(titles), "queries": _texts_digest(queries), "item_tokens": item_tokens,
               "query_tokens": QUERY_TOKENS}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / f"student-{key}"
    if (folder / LOG_FILE).is_file() and (folder / "config.json").is_file():
        logger.info("student reused from %s", folder)
        return Student(folder, teacher, json.loads((folder / LOG_FILE).read_text()), cached=True)
    import torch

    torch.set_num_threads(settings.threads)
    t_tok, t_model = load_model(teacher)
    title_targets = embed_many(t_model, t_tok, titles, item_tokens, 128, progress=progress, desc="teacher titles")
    q_targets = query_targets(t_model, t_tok, queries, title_targets.shape[1], progress)
    del t_model
    with folders.filled(folder, f".student-{key}-") as work:
        log = train_student(teacher, layers, titles, title_targets, queries, q_targets, settings, work,
                            progress=progress)
        (work / LOG_FILE).write_text(json.dumps(log, indent=2))
    logger.info("student written to %s", folder)
    return Student(folder, teacher, log, cached=False)


def query_targets(model: Any, tok: Any, queries: Sequence[str], dim: int, progress: bool) -> np.ndarray:
    """The teacher's vectors of ``queries`` at the serving query length ((0, dim) when there are none)."""
    if not queries:
        return np.zeros((0, dim), np.float32)
    return embed_many(model, tok, queries, QUERY_TOKENS, 128, progress=progress, desc="teacher queries")


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def _artifact_titles(artifact: Path) -> tuple[list[str], np.ndarray, int]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    titles = [json.loads(line)["title"] for line in (artifact / "items.jsonl").open()]
    emb = np.load(artifact / "embeddings.npy")
    if emb.shape[0] != len(titles):
        raise ValueError(f"{artifact}: {emb.shape[0]} embeddings for {len(titles)} items")
    return titles, emb, int(manifest["encoder"]["max_item_tokens"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.shrink", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="Hugging Face BERT folder (the served checkpoint)")
    p.add_argument("--layers", default="0,2,4", help="teacher layers kept, comma-separated")
    p.add_argument("--artifact", type=Path, required=True, help="artifact built from the teacher (titles + vectors)")
    p.add_argument("--judgments", type=Path, help="query,product_id,relevance CSV: its TRAIN queries are added")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init", type=Path, help="continue from this student folder (its layers) instead of the teacher's")
    p.add_argument("--epochs", type=int, default=DistillSettings.epochs)
    p.add_argument("--batch-size", type=int, default=DistillSettings.batch_size)
    p.add_argument("--lr", type=float, default=DistillSettings.lr)
    p.add_argument("--max-length", type=int, default=DistillSettings.max_length)
    p.add_argument("--threads", type=int, default=DistillSettings.threads)
    p.add_argument("--limit", type=int, default=0, help="first N titles only (smoke runs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    settings = DistillSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                               threads=args.threads)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    titles, targets, item_tokens = _artifact_titles(args.artifact)
    if args.limit:
        titles, targets = titles[:args.limit], targets[:args.limit]
    # sanity: the artifact's vectors are this teacher's (torch vs ONNX fp32, a few rows)
    t_tok, teacher = load_model(args.teacher)
    check = cosine_to(teacher, t_tok, titles[:64], targets[:64], item_tokens)
    logger.info("teacher vs the artifact's embeddings: mean cosine %.5f over 64 titles", check)
    if check < 0.999:
        raise SystemExit(f"{args.artifact}: embeddings are not {args.teacher}'s (mean cosine {check:.4f})")
    queries: list[str] = []
    if args.judgments:
        queries = train_queries(read_judgments(args.judgments))
    q_targets = query_targets(teacher, t_tok, queries, targets.shape[1], progress=not args.no_progress)
    del teacher
    with folders.filled(args.out, f".{args.out.name}-") as work:  # out appears only once trained
        log = train_student(args.teacher, layers, titles, targets, queries, q_targets, settings, work,
                            progress=not args.no_progress, init=args.init)
        log["teacher_check_cosine"] = check
        (work / LOG_FILE).write_text(json.dumps(log, indent=2))
    print(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
