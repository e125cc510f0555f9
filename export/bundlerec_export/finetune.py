"""Fine-tune the query/title bi-encoder (all-MiniLM-L6-v2) on graded query-product judgments, on CPU.

Plain torch + transformers, mean pooling + L2 normalisation exactly like the serving
:class:`bundlerec_server.encoder.Encoder`, so the ONNX export of the result serves without skew. Only ``train``
queries of :func:`bundlerec_export.evaluation.split_of` are trained on (InfoNCE over in-batch + hard negatives,
false negatives masked; optionally a listwise KL to the served hybrid ranking's teacher lists, ``--distill``);
``dev`` is scored per epoch on a subsample catalog; ``test`` is never read. Writes an
HF model folder, ``train_log.json`` and ``training.png`` into ``out``. Seeds, threads and data order are fixed.
The sampling, loss and evaluation choices are described in ``docs/export-notes.md``.

    python -m bundlerec_export.finetune --judgments ../shared/data/homedepot/judgments.csv \\
        --products ../shared/data/homedepot/products.csv --out /tmp/ft [--epochs 2 ...]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import to_json
from .evaluation import Judgments, aggregate, query_metrics, read_judgments, split_of
from .offline import ensure_offline

if TYPE_CHECKING:
    import torch

__all__ = ["FinetuneConfig", "evaluate_model", "finetune", "read_judgments", "split_of", "summary"]

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LOG_FILE = "train_log.json"
PLOT_FILE = "training.png"
TRAINING_FILES = (LOG_FILE, PLOT_FILE)  # copied into the artifact


# ----------------------------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    judgments: Path
    out: Path
    products: Path | None = None  # product_id,title CSV (or pass ``titles`` to ``finetune``)
    base_model: Path | None = None  # default: the packaged all-MiniLM-L6-v2
    epochs: int = 2
    batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    train_query_tokens: int = 32  # query truncation in training and dev evaluation (serving truncates at 64)
    max_title_tokens: int = 48
    pos_min_rel: float = 2.33  # positives: relevance >= this
    pos_weight_power: float = 1.0  # positive sampling weight (relevance - 1) ** power
    neg_max_rel: float = 1.75  # judged negatives: relevance <= this; products judged above are never negatives
    hard_negatives: int = 1  # per query
    p_judged_negative: float = 0.5  # pick a judged low-relevance negative (when the query has one) vs BM25
    bm25_k: int = 30  # BM25 candidates mined per train query
    typo_prob: float = 0.1
    seed: int = 0
    threads: int = 2
    # distillation (docs/ranking.md): teacher lists of bundlerec_export.distill; off when None
    distill: Path | None = None
    distill_candidates: int = 3  # teacher-list products sampled per query per step (beside its positive)
    distill_weight: float = 1.0  # KL weight beside the InfoNCE
    distill_temperature: float = 1.0  # teacher scores / this (the student's cosines / ``temperature``)
    max_steps: int | None = None  # stop after N optimizer steps in total (tests / smoke runs)
    eval_dev: bool = True
    eval_before: bool = False  # also evaluate the base model (epoch 0) on dev
    eval_random_products: int = 10_000
    eval_batch_size: int = 128
    dev_fraction: float = 0.1  # passed to split_of: must match the evaluation defaults to keep the split
    test_fraction: float = 0.1
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        self.judgments = Path(self.judgments)
        self.out = Path(self.out)
        for name in ("products", "base_model", "distill"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, Path(v))
        if self.epochs < 1 or self.batch_size < 2 or self.hard_negatives < 0:
            raise ValueError("epochs >= 1, batch_size >= 2 and hard_negatives >= 0 required")
        if not self.neg_max_rel < self.pos_min_rel:
            raise ValueError("neg_max_rel must be below pos_min_rel")
        if self.distill_candidates < 1 or self.distill_temperature <= 0 or self.distill_weight < 0:
            raise ValueError("distill_candidates >= 1, distill_temperature > 0 and distill_weight >= 0 required")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = to_json(asdict(self))
        return d

    def cache_key(self, data_digest: str) -> str:
        """Hash of everything that changes the trained weights (not paths, progress or plotting)."""
        d = self.as_dict()
        for k in ("judgments", "out", "products", "progress", "plot"):
            d.pop(k, None)
        if self.distill is None:  # keys of fine-tunes without distillation stay what they were before the option
            for k in DISTILL_SETTINGS:
                d.pop(k, None)
        else:
            d["distill"] = file_digest(self.distill)[:16]
        for old, new in LEGACY_SETTINGS.items():  # hashed under the old name: caches from before the rename stay valid
            d[old] = d.pop(new)
        d["base_model"] = _model_digest(self.base_model or _default_base_model())
        d["data"] = data_digest
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


LEGACY_SETTINGS = {"max_query_tokens": "train_query_tokens"}  # old name -> FinetuneConfig field
DISTILL_SETTINGS = ("distill", "distill_candidates", "distill_weight", "distill_temperature")


def upgrade_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Fine-tune settings (``FinetuneConfig`` keyword arguments or a logged config) with old names renamed."""
    out = dict(settings)
    for old, new in LEGACY_SETTINGS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def _default_base_model() -> Path:
    from bundlerec_export.onnx_export import default_base_model

    return default_base_model()


def _model_digest(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"):
        p = Path(path) / name
        if p.is_file():
            h.update(name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- data


def read_titles(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        id_col = "product_id" if "product_id" in (reader.fieldnames or ()) else "id"
        for row in reader:
            t = (row.get("title") or "").strip()
            if t:
                out[row[id_col].strip()] = t
    return out


_WS = re.compile(r"\s+")


def _norm_title(t: str) -> str:
    return _WS.sub(" ", t.strip().lower())


@dataclass
class QueryData:
    query: str
    positives: list[str]
    pos_weights: list[float]
    forbidden: frozenset[str]  # judged above neg_max_rel: never a negative
    forbidden_titles: frozenset[str]  # normalised titles of forbidden products
    judged_negatives: list[str]
    bm25_negatives: list[str] = field(default_factory=list)
    teacher_ids: list[str] = field(default_factory=list)  # the served top of the query (distillation)
    teacher_scores: list[float] = field(default_factory=list)  # teacher targets, judged labels applied
    positive_targets: list[float] = field(default_factory=list)  # teacher target of each positive


@dataclass
class Splits:
    train: dict[str, dict[str, float]]
    dev: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


def split_judgments(judgments: Mapping[str, Mapping[str, float]], dev: float = 0.1, test: float = 0.1) -> Splits:
    parts: dict[str, Judgments] = {"train": {}, "dev": {}, "test": {}}
    for q, j in judgments.items():
        parts[split_of(q, dev=dev, test=test)][q] = dict(j)
    return Splits(**parts)


def build_training_queries(
    train: Mapping[str, Mapping[str, float]], titles: Mapping[str, str], cfg: FinetuneConfig
) -> list[QueryData]:
    """Train queries with at least one positive that has a title; sorted by query text (determinism)."""
    out: list[QueryData] = []
    for q in sorted(train):
        j = {p: r for p, r in train[q].items() if p in titles}
        pos = sorted(p for p, r in j.items() if r >= cfg.pos_min_rel)
        if not pos:
            continue
        forbidden = frozenset(p for p, r in j.items() if r > cfg.neg_max_rel)
        f_titles = frozenset(_norm_title(titles[p]) for p in forbidden)
        jneg = sorted(p for p, r in j.items() if r <= cfg.neg_max_rel and _norm_title(titles[p]) not in f_titles)
        weights = [max(j[p] - 1.0, 1e-3) ** cfg.pos_weight_power for p in pos]
        out.append(QueryData(q, pos, weights, forbidden, f_titles, jneg))
    return out


def _bm25_tokenize(texts: Sequence[str]) -> Any:
    import bm25s
    import Stemmer

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets DEBUG on itself
    return bm25s.tokenize(list(texts), lower=True, stopwords="en", stemmer=Stemmer.Stemmer("english"),
                          show_progress=False)


def bm25_rank(queries: Sequence[str], doc_ids: Sequence[str], doc_titles: Sequence[str], k: int) -> list[list[str]]:
    """Top-k doc ids per query with bm25s (lucene, k1 1.5, b 0.75, the artifact's lexical settings)."""
    import bm25s

    if not queries:
        return []
    k = min(k, len(doc_ids))
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(_bm25_tokenize(doc_titles), show_progress=False)
    qtok = _bm25_tokenize(queries)
    out: list[list[str]] = []
    # bm25s.retrieve wants token ids of its own vocabulary; pass lists of strings instead (portable across versions)
    vocab_inv = {v: key for key, v in qtok.vocab.items()}
    q_strings = [[vocab_inv[t] for t in ids] for ids in qtok.ids]
    for start in range(0, len(q_strings), 2048):
        chunk = q_strings[start:start + 2048]
        # an empty token list makes bm25s raise; give it a token that matches nothing
        chunk = [c if c else ["\x00"] for c in chunk]
        docs, scores = retriever.retrieve(chunk, k=k, show_progress=False, n_threads=1)
        for row, srow in zip(docs, scores):
            out.append([doc_ids[int(d)] for d, s in zip(row, srow) if s > 0])
    return out


def mine_bm25_negatives(qdata: list[QueryData], titles: Mapping[str, str], k: int) -> None:
    """Fills ``bm25_negatives``: BM25 top-k titles of each query minus its forbidden products/titles."""
    ids = sorted(titles)
    ranked = bm25_rank([q.query for q in qdata], ids, [titles[i] for i in ids], k)
    for q, cands in zip(qdata, ranked):
        q.bm25_negatives = [p for p in cands if p not in q.forbidden and _norm_title(titles[p]) not in q.forbidden_titles]


def label_target(rel: float, lo: float, hi: float) -> float:
    """A judged product's teacher target: its gain (relevance - 1, 0..2) placed linearly on the query's teacher
    range (relevance 3 = the list's best score, 1 = its worst)."""
    return lo + (hi - lo) * min(max((rel - 1.0) / 2.0, 0.0), 1.0)


def attach_teacher(qdata: list[QueryData], teacher: Mapping[str, tuple[Sequence[str], Any]],
                   train: Mapping[str, Mapping[str, float]], titles: Mapping[str, str]) -> int:
    """Fills the teacher lists of the train queries that have one (products with a title only); judged products
    take :func:`label_target` instead of the teacher's score. Returns how many queries got a list."""
    n = 0
    for q in qdata:
        entry = teacher.get(q.query)
        if entry is None:
            continue
        ids, scores = entry
        keep = [(p, float(s)) for p, s in zip(ids, scores) if p in titles]
        if not keep:
            continue
        lo, hi = min(s for _, s in keep), max(s for _, s in keep)
        if hi - lo < 1e-6:
            hi = lo + 1.0
        rel = train[q.query]
        q.teacher_ids = [p for p, _ in keep]
        q.teacher_scores = [label_target(rel[p], lo, hi) if p in rel else s for p, s in keep]
        q.positive_targets = [label_target(rel[p], lo, hi) for p in q.positives]
        n += 1
    return n


# ----------------------------------------------------------------------------------------------- augmentation

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def add_typo(query: str, rng: random.Random) -> str:
    """One random edit (swap / delete / insert / replace) inside one word of >= 4 letters; else unchanged."""
    words = query.split(" ")
    cands = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not cands:
        return query
    i = rng.choice(cands)
    w = words[i]
    op = rng.randrange(4)
    pos = rng.randrange(1, len(w) - 1)  # keep the first letter
    if op == 0:
        w = w[:pos] + w[pos + 1] + w[pos] + w[pos + 2:]
    elif op == 1:
        w = w[:pos] + w[pos + 1:]
    elif op == 2:
        w = w[:pos] + rng.choice(_LETTERS) + w[pos:]
    else:
        w = w[:pos] + rng.choice(_LETTERS) + w[pos + 1:]
    words[i] = w
    return " ".join(words)


@dataclass
class Example:
    query: str  # possibly with a typo
    qidx: int  # index into the QueryData list
    positive: str
    negatives: list[str]
    distill: list[str] = field(default_factory=list)  # teacher-list products (the positive is not among them)
    targets: list[float] = field(default_factory=list)  # teacher targets of [positive, *distill]


def sample_epoch(qdata: list[QueryData], cfg: FinetuneConfig, rng: random.Random) -> list[Example]:
    """One example per train query, shuffled; every random choice from ``rng``."""
    order = list(range(len(qdata)))
    rng.shuffle(order)
    out = []
    for qi in order:
        q = qdata[qi]
        pos = rng.choices(q.positives, weights=q.pos_weights, k=1)[0]
        negs: list[str] = []
        for _ in range(cfg.hard_negatives):
            judged = [p for p in q.judged_negatives if p not in negs]
            bm = [p for p in q.bm25_negatives if p not in negs]
            use_judged = bool(judged) and (not bm or rng.random() < cfg.p_judged_negative)
            pool = judged if use_judged else bm
            if pool:
                negs.append(rng.choice(pool))
        text = add_typo(q.query, rng) if rng.random() < cfg.typo_prob else q.query
        ex = Example(text, qi, pos, negs)
        if cfg.distill is not None and q.teacher_ids:
            listed = [i for i, p in enumerate(q.teacher_ids) if p != pos]
            picked = sorted(rng.sample(listed, min(cfg.distill_candidates, len(listed))))
            ex.distill = [q.teacher_ids[i] for i in picked]
            ex.targets = [q.positive_targets[q.positives.index(pos)]] + [q.teacher_scores[i] for i in picked]
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------- model


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model(path: Path) -> tuple[Any, Any]:
    """(tokenizer, model) of a local Hugging Face folder."""
    ensure_offline()
    from transformers import AutoModel, AutoTokenizer

    # transformers does not annotate AutoTokenizer.from_pretrained
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    # the pooler (if any) is unused by mean pooling: it gets no gradient and is saved unchanged
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return tok, model


def embed(model: Any, tok: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """Mean pooling under the attention mask + L2 normalisation (as the serving Encoder)."""
    import torch

    batch = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if "token_type_ids" in batch and "token_type_ids" not in _model_inputs(model):
        batch.pop("token_type_ids")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def _model_inputs(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def embed_many(model: Any, tok: Any, texts: Sequence[str], max_length: int, batch_size: int, progress: bool = False,
               desc: str = "embed") -> np.ndarray:
    """Eval-mode embeddings in length-sorted batches; rows in input order."""
    import torch

    was_training = model.training
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    with torch.inference_mode():
        for s in starts:
            rows = order[s:s + batch_size]
            e = embed(model, tok, [texts[i] for i in rows], max_length).numpy()
            if out is None:
                out = np.zeros((len(texts), e.shape[1]), dtype=np.float32)
            out[rows] = e
    model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """InfoNCE: q (B, dim), d (N, dim) normalised; labels (B,) index of each query's positive in d;
    mask (B, N) bool True where a candidate must not count (false negative)."""
    import torch

    scores = q @ d.T / temperature
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, labels)


def distill_loss(q: torch.Tensor, d: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, temperature: float,
                 teacher_temperature: float) -> torch.Tensor:
    """Listwise KL(teacher || student) per query, averaged: q (B, dim), d (N, dim) normalised; index (B, L) rows of
    d in each query's list (-1: padding); targets (B, L) teacher scores. Teacher softmax(targets /
    ``teacher_temperature``), student softmax(cosine / ``temperature``) over the same list."""
    import torch

    valid = index >= 0
    s = (q.unsqueeze(1) * d[index.clamp(min=0)]).sum(-1) / temperature
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype)
    log_s = torch.log_softmax(torch.where(valid, s, neg_inf), dim=-1)
    log_t = torch.log_softmax(torch.where(valid, targets / teacher_temperature, neg_inf), dim=-1)
    kl = torch.where(valid, log_t.exp() * (log_t - log_s), torch.zeros_like(s)).sum(-1)
    rows = valid.sum(-1) > 1  # a one-product list carries no order
    return kl[rows].mean() if bool(rows.any()) else s.sum() * 0.0


def batch_tensors(batch: list[Example], qdata: list[QueryData],
                  titles: Mapping[str, str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Documents (positives first, then negatives, then teacher-list products), labels and the false-negative mask
    of one batch. A query's own teacher-list products count as InfoNCE negatives only where judged low (the KL
    orders the rest)."""
    import torch

    docs = ([ex.positive for ex in batch] + [n for ex in batch for n in ex.negatives]
            + [p for ex in batch for p in ex.distill])
    owner = [-1] * (len(docs) - sum(len(ex.distill) for ex in batch)) + [i for i, ex in enumerate(batch)
                                                                            for _ in ex.distill]
    doc_titles = [_norm_title(titles[p]) for p in docs]
    labels = torch.arange(len(batch))
    mask = torch.zeros((len(batch), len(docs)), dtype=torch.bool)
    for i, ex in enumerate(batch):
        q = qdata[ex.qidx]
        pos_title = doc_titles[i]
        low = set(q.judged_negatives) if ex.distill else set()
        for j, (p, t) in enumerate(zip(docs, doc_titles)):
            if j == i:
                continue
            if (p in q.forbidden or t in q.forbidden_titles or t == pos_title or p == ex.positive
                    or (owner[j] == i and p not in low)):
                mask[i, j] = True
    return docs, labels, mask


def distill_tensors(batch: list[Example], n_plain: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, targets) for :func:`distill_loss`: each query's list is its positive (row i of the documents of
    :func:`batch_tensors`) and its teacher-list products (after the ``n_plain`` positives and negatives)."""
    import torch

    width = max((len(ex.targets) for ex in batch), default=0)
    index = torch.full((len(batch), width), -1, dtype=torch.long)
    targets = torch.zeros((len(batch), width), dtype=torch.float32)
    nxt = n_plain
    for i, ex in enumerate(batch):
        if not ex.targets:
            continue
        rows = [i] + list(range(nxt, nxt + len(ex.distill)))
        nxt += len(ex.distill)
        index[i, : len(rows)] = torch.tensor(rows)
        targets[i, : len(rows)] = torch.tensor(ex.targets, dtype=torch.float32)
    return index, targets


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass
class DevSet:
    queries: list[str]
    judgments: list[dict[str, float]]
    doc_ids: list[str]
    doc_titles: list[str]
    bm25: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"queries": len(self.queries), "catalog": len(self.doc_ids), "bm25": self.bm25}


def make_dev_set(dev: Mapping[str, Mapping[str, float]], titles: Mapping[str, str], n_random: int, seed: int) -> DevSet:
    """Dev queries + a subsample catalog: every product judged for a dev query plus ``n_random`` others."""
    judged = sorted({p for j in dev.values() for p in j if p in titles})
    judged_set = set(judged)
    others = sorted(p for p in titles if p not in judged_set)
    rng = random.Random(seed + 7)
    extra = sorted(rng.sample(others, min(n_random, len(others))))
    ids = judged + extra
    qs = sorted(dev)
    return DevSet(qs, [dict(dev[q]) for q in qs], ids, [titles[p] for p in ids])


def score_rankings(rankings: Sequence[Sequence[str]], judgments: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    return dict(aggregate(query_metrics(r, j, 10) for r, j in zip(rankings, judgments)))


def evaluate_dense(model: Any, tok: Any, ds: DevSet, cfg: FinetuneConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    d = embed_many(model, tok, ds.doc_titles, cfg.max_title_tokens, cfg.eval_batch_size, cfg.progress, "dev catalog")
    q = embed_many(model, tok, ds.queries, cfg.train_query_tokens, cfg.eval_batch_size)
    rankings = []
    for s in range(0, len(q), 256):
        sc = q[s:s + 256] @ d.T
        top = np.argpartition(-sc, min(10, sc.shape[1] - 1), axis=1)[:, :10]
        for row, cand in zip(sc, top):
            cand = cand[np.argsort(-row[cand], kind="stable")]
            rankings.append([ds.doc_ids[c] for c in cand])
    res = score_rankings(rankings, ds.judgments)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------- training


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def evaluate_model(cfg: FinetuneConfig, titles: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The per-epoch dev check (same subsample catalog for the same seed and data) of ``cfg.base_model`` as is:
    checkpoints trained elsewhere compare with a fine-tune's logged figures."""
    ensure_offline()
    import torch

    if titles is None:
        if cfg.products is None:
            raise ValueError("FinetuneConfig.products (or titles=) is required")
        titles = read_titles(cfg.products)
    splits = split_judgments(read_judgments(cfg.judgments), cfg.dev_fraction, cfg.test_fraction)
    if not splits.dev:
        raise ValueError(f"{cfg.judgments}: no dev query")
    dev_set = make_dev_set(splits.dev, titles, cfg.eval_random_products, cfg.seed)
    prev = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        tok, model = load_model(cfg.base_model or _default_base_model())
        res = evaluate_dense(model, tok, dev_set, cfg)
    finally:
        torch.set_num_threads(prev)
    return {"model": str(cfg.base_model), "dev": res, "dev_eval": dev_set.describe()}


def finetune(cfg: FinetuneConfig, titles: Mapping[str, str] | None = None) -> Path:
    """Trains, writes the model folder + ``train_log.json`` + ``training.png`` into ``cfg.out``; returns it."""
    ensure_offline()
    import torch

    t_start = time.perf_counter()
    base = cfg.base_model or _default_base_model()
    if titles is None:
        if cfg.products is None:
            raise ValueError("FinetuneConfig.products (or titles=) is required")
        titles = read_titles(cfg.products)
    judgments = read_judgments(cfg.judgments)
    splits = split_judgments(judgments, cfg.dev_fraction, cfg.test_fraction)
    qdata = build_training_queries(splits.train, titles, cfg)
    if not qdata:
        raise ValueError("no training query with a positive product (relevance >= pos_min_rel) and a title")
    t = time.perf_counter()
    if cfg.hard_negatives:
        mine_bm25_negatives(qdata, titles, cfg.bm25_k)
    teacher_meta: dict[str, Any] | None = None
    if cfg.distill is not None:
        from .distill import read_teacher

        teacher = read_teacher(cfg.distill)
        n = attach_teacher(qdata, teacher.lists, splits.train, titles)
        teacher_meta = {**teacher.meta, "train_queries_with_list": n}
        logger.info("teacher lists: %d of %d train queries (%s)", n, len(qdata), teacher.meta.get("teacher"))
    mining_s = time.perf_counter() - t

    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _seed_all(cfg.seed)
        tok, model = load_model(base)
        model.train()
        rng = random.Random(cfg.seed)

        dev_set = None
        if cfg.eval_dev and splits.dev:
            dev_set = make_dev_set(splits.dev, titles, cfg.eval_random_products, cfg.seed)
            ids = dev_set.doc_ids
            ranked = bm25_rank(dev_set.queries, ids, dev_set.doc_titles, 10)
            dev_set.bm25 = score_rankings(ranked, dev_set.judgments)
            logger.info("dev subsample: %d queries, %d products; BM25 NDCG@10 %.4f", len(dev_set.queries),
                        len(ids), dev_set.bm25["ndcg"] or 0.0)

        steps_per_epoch = math.ceil(len(qdata) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        groups = [
            {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
             "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(round(total * cfg.warmup_ratio))))

        losses: list[float] = []
        kl_losses: list[float] = []
        epochs_log: list[dict[str, Any]] = []
        eval_s = 0.0
        if dev_set is not None and cfg.eval_before:
            r = evaluate_dense(model, tok, dev_set, cfg)
            eval_s += r["seconds"]
            epochs_log.append({"epoch": 0, "step": 0, "dev": r})
            logger.info("epoch 0 (base model): dev NDCG@10 %.4f", r["ndcg"] or 0.0)

        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="fine-tune", unit="step")
        step = 0
        for epoch in range(1, cfg.epochs + 1):
            if step >= total:
                break
            examples = sample_epoch(qdata, cfg, rng)
            t_epoch = time.perf_counter()
            ep_losses = []
            for s in range(0, len(examples), cfg.batch_size):
                if step >= total:
                    break
                batch = examples[s:s + cfg.batch_size]
                if len(batch) < 2:
                    continue
                docs, labels, mask = batch_tensors(batch, qdata, titles)
                qv = embed(model, tok, [ex.query for ex in batch], cfg.train_query_tokens)
                dv = embed(model, tok, [titles[p] for p in docs], cfg.max_title_tokens)
                loss = contrastive_loss(qv, dv, labels, mask, cfg.temperature)
                if cfg.distill is not None:
                    index, targets = distill_tensors(batch, len(docs) - sum(len(ex.distill) for ex in batch))
                    kl = distill_loss(qv, dv, index, targets, cfg.temperature, cfg.distill_temperature)
                    kl_losses.append(float(kl.detach()))
                    loss = loss + cfg.distill_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                lv = float(loss.detach())
                losses.append(lv)
                ep_losses.append(lv)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{lv:.3f}")
            entry: dict[str, Any] = {"epoch": epoch, "step": step, "mean_loss": float(np.mean(ep_losses)) if ep_losses else None,
                                     "train_seconds": round(time.perf_counter() - t_epoch, 1)}
            if dev_set is not None:
                r = evaluate_dense(model, tok, dev_set, cfg)
                eval_s += r["seconds"]
                entry["dev"] = r
                msg = f"epoch {epoch}: mean loss {entry['mean_loss']:.4f}, dev NDCG@10 {r['ndcg']:.4f}"
                (bar.write(msg) if bar is not None else logger.info(msg))
            epochs_log.append(entry)
        if bar is not None:
            bar.close()

        out = cfg.out
        out.mkdir(parents=True, exist_ok=True)
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(base) / name).is_file():
                shutil.copyfile(Path(base) / name, out / name)
    finally:
        torch.set_num_threads(prev_threads)

    seconds = round(time.perf_counter() - t_start, 1)
    log: dict[str, Any] = {
        "base_model": str(base),
        "config": cfg.as_dict(),
        "split_sizes": splits.sizes(),
        "train_queries_used": len(qdata),
        "train_pairs": {"positives": sum(len(q.positives) for q in qdata),
                        "judged_negatives": sum(len(q.judged_negatives) for q in qdata),
                        "queries_with_judged_negatives": sum(1 for q in qdata if q.judged_negatives),
                        "bm25_negatives": sum(len(q.bm25_negatives) for q in qdata)},
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "loss": losses,
        **({"kl_loss": kl_losses, "teacher": teacher_meta} if teacher_meta is not None else {}),
        "epochs": epochs_log,
        "dev_eval": (
            {"catalog": "subsample: all products judged for dev queries + "
                        f"{cfg.eval_random_products} fixed random others (seed {cfg.seed})",
             **dev_set.describe()} if dev_set is not None else None),
        "seconds": {"total": seconds, "mining": round(mining_s, 1), "eval": round(eval_s, 1),
                    "train": round(seconds - eval_s - mining_s, 1)},
        "threads": cfg.threads or prev_threads,
        "torch": torch.__version__,
    }
    (cfg.out / LOG_FILE).write_text(json.dumps(log, indent=1))
    if cfg.plot:
        plot_training(log, cfg.out / PLOT_FILE)
    logger.info("fine-tuned model written to %s in %.1f s", cfg.out, seconds)
    return cfg.out


def summary(log: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``encoder.training``: dev metric per epoch, seconds, split sizes and key settings."""
    c = upgrade_settings(log["config"])
    return {
        "split": "bundlerec_export.evaluation.split_of (80/10/10 by stable hash of the normalised query)",
        "split_sizes": log["split_sizes"],
        "train_queries_used": log["train_queries_used"],
        "steps": log["steps"],
        "seconds": log["seconds"],
        "final_loss": (float(np.mean(log["loss"][-20:])) if log["loss"] else None),
        "dev_eval": ({k: v for k, v in log["dev_eval"].items()} if log.get("dev_eval") else None),
        "dev_per_epoch": [{"epoch": e["epoch"], **({"ndcg@10": e["dev"]["ndcg"], "recall@10": e["dev"]["recall"],
                                                     "mrr@10": e["dev"]["mrr"]} if "dev" in e else {})}
                          for e in log["epochs"]],
        "settings": {k: c[k] for k in ("epochs", "batch_size", "lr", "temperature", "train_query_tokens",
                                       "max_title_tokens", "pos_min_rel", "neg_max_rel", "hard_negatives",
                                       "typo_prob", "seed") if k in c},
        "loss": "in-batch + hard negatives InfoNCE (MultipleNegativesRanking), false negatives masked"
                + (" + listwise KL to the served hybrid ranking's teacher lists" if c.get("distill") else ""),
        **({"distill": {k: c[k] for k in DISTILL_SETTINGS}} if c.get("distill") else {}),
    }


def plot_training(log: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.asarray(log["loss"], dtype=float)
    a.plot(np.arange(1, len(loss) + 1), loss, lw=0.7, alpha=0.5, label="loss")
    if len(loss) >= 10:
        w = 10
        a.plot(np.arange(w, len(loss) + 1), np.convolve(loss, np.ones(w) / w, mode="valid"), lw=1.5, label="mean of 10")
    spe = log.get("steps_per_epoch") or 0
    for e in log["epochs"]:
        if e.get("step"):
            a.axvline(e["step"], color="grey", ls=":", lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("InfoNCE loss")
    a.set_title(f"training loss ({spe} steps/epoch)")
    a.legend()
    ev = [(e["epoch"], e["dev"]["ndcg"]) for e in log["epochs"] if e.get("dev") and e["dev"].get("ndcg") is not None]
    if ev:
        b.plot([x for x, _ in ev], [y for _, y in ev], "o-", label="dense (torch fp32)")
    bm = (log.get("dev_eval") or {}).get("bm25") or {}
    if bm.get("ndcg") is not None:
        b.axhline(bm["ndcg"], color="C3", ls="--", label="BM25")
    b.set_xlabel("epoch")
    b.set_ylabel("dev NDCG@10 (subsample catalog)")
    b.set_title("dev NDCG@10 per epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d = FinetuneConfig(judgments=Path("."), out=Path("."))
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--products", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base-model", type=Path)
    p.add_argument("--distill", type=Path, help="teacher lists (python -m bundlerec_export.distill): add the KL loss")
    for name in ("epochs", "batch_size", "lr", "temperature", "train_query_tokens", "max_title_tokens", "pos_min_rel",
                 "neg_max_rel", "hard_negatives", "p_judged_negative", "bm25_k", "typo_prob", "seed", "threads",
                 "max_steps", "eval_random_products", "warmup_ratio", "weight_decay", "distill_candidates",
                 "distill_weight", "distill_temperature"):
        default = getattr(d, name)
        typ = int if isinstance(default, int) or name == "max_steps" else float
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default)
    p.add_argument("--eval-before", action="store_true", help="also evaluate the base model on dev (epoch 0)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: the dev check of --base-model (same subsample for the same --seed); --out unused")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    ensure_offline()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bundlerec_export").setLevel(logging.INFO)
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    kw = {k: v for k, v in vars(args).items() if k not in ("eval_before", "no_eval", "no_progress", "eval_only")}
    cfg = FinetuneConfig(**kw, eval_before=args.eval_before, eval_dev=not args.no_eval, progress=not args.no_progress)
    if args.eval_only:
        print(json.dumps(evaluate_model(cfg), indent=1))
        return 0
    out = finetune(cfg)
    log = json.loads((out / LOG_FILE).read_text())
    print(json.dumps(summary(log), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
