"""The optional re-ranking stage: a MiniLM cross-encoder (query and title in one input, one logit) over the top
``rerank_depth`` hits of the retrieval, shipped in the artifact (``cross_encoder/``, ``manifest["cross_encoder"]``).

The served graph is the per-token int8 one (batch-exact: a pair's score does not depend on the other pairs of the
request); a load-time probe checks it, and a graph that is not batch-exact scores one pair per run. The new order
keeps the old scores (sorted, handed out in the new order), so hits below the re-ranked top stay below it and
bundling sees the same scale. Scoring: ``(1 - w) x minmax(logit) + w x minmax(retrieval score)`` over the top, with
``w`` (``blend``) chosen on dev by the export; ties keep the retrieval order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import ArtifactError
from .domain import Hit
from .encoder import session_options

logger = logging.getLogger(__name__)

CROSS_ENCODER_DIR = "cross_encoder"
CROSS_ENCODER_FILES = {"fp32": "cross_encoder/fp32.onnx", "int8_pertoken": "cross_encoder/int8_pertoken.onnx"}
CROSS_ENCODER_TOKENIZER = "cross_encoder/tokenizer.json"
SERVED_VARIANT = "int8_pertoken"
DEFAULT_MAX_LENGTH = 48
PROBE = ("drill", "1/2 in. copper pipe fitting", "outdoor ceiling fan with light and remote", "paint")
PROBE_TITLES = ("DEWALT 20-Volt MAX Lithium-Ion Cordless Drill", "SharkBite 1/2 in. Push-to-Connect Coupling",
                "Hampton Bay 52 in. Outdoor Ceiling Fan", "BEHR PREMIUM PLUS 1 gal. Ultra Pure White Flat Interior Paint",
                "x")


class CrossEncoder:
    """Logits of (query, title) pairs from an ONNX sequence-classification graph with one output."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, *, max_length: int = DEFAULT_MAX_LENGTH,
                 intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.max_length = max_length
        self.tokenizer = pair_tokenizer(tokenizer_path, max_length)
        opts = session_options(intra_op_threads)
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._input_names = {i.name for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        if out.shape[-1] != 1:
            raise ArtifactError(f"{self.model_path}: output {out.name} has shape {out.shape}, expected one logit per pair")
        self.one_per_run = False

    def tokenize(self, query: str, titles: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask, types = pair_arrays(self.tokenizer, [(query, t) for t in titles])
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = types
        return feeds

    def _run(self, query: str, titles: Sequence[str]) -> np.ndarray:
        out = self.session.run(None, self.tokenize(query, titles))[0]
        return np.asarray(out, dtype=np.float32).reshape(len(titles))

    def logits(self, query: str, titles: Sequence[str]) -> np.ndarray:
        """One logit per title (float32); one ONNX run for all, or one per title where batching is not exact."""
        if not titles:
            return np.zeros(0, dtype=np.float32)
        if self.one_per_run:
            return np.concatenate([self._run(query, [t]) for t in titles])
        return self._run(query, titles)

    def probe_batch_exact(self) -> bool:
        """Each probe pair alone vs all pairs of a query in one batch, bit for bit; sets ``one_per_run`` if not."""
        worst = 0.0
        for q in PROBE:
            together = self._run(q, PROBE_TITLES)
            alone = np.concatenate([self._run(q, [t]) for t in PROBE_TITLES])
            worst = max(worst, float(np.abs(together - alone).max()))
        self.one_per_run = worst != 0.0
        if self.one_per_run:
            logger.warning("cross-encoder %s is NOT batch-exact (max |alone - batched| %.2e): one pair per run",
                           self.model_path.name, worst)
        return not self.one_per_run


def pair_tokenizer(path: str | Path, max_length: int) -> Any:
    """The pair tokenizer of export and server alike: truncation longest-first to ``max_length``, no padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    tok.no_padding()
    return tok


def pair_arrays(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, token_type_ids of ``[CLS] query [SEP] title [SEP]`` pairs, right-padded to the
    longest pair."""
    encs = tokenizer.encode_batch(list(pairs))
    width = max(1, max(len(e.ids) for e in encs))
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, enc in enumerate(encs):
        n = len(enc.ids)
        ids[row, :n], mask[row, :n], types[row, :n] = enc.ids, 1, enc.type_ids
    return ids, mask, types


def minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def rerank_order(logits: np.ndarray, retrieval: np.ndarray, blend: float) -> np.ndarray:
    """Positions of the re-ranked top in their new order: by ``(1 - blend) minmax(logits) + blend minmax(retrieval)``,
    descending, ties in retrieval order (stable)."""
    score = (1.0 - blend) * minmax(logits.astype(np.float64)) + blend * minmax(retrieval.astype(np.float64))
    return np.argsort(-score, kind="stable")


def reorder(hits: Sequence[Hit], order: np.ndarray) -> list[Hit]:
    """``hits`` in ``order``; the scores stay the old ones, sorted, handed out in the new order."""
    scores = sorted((h.score for h in hits), reverse=True)
    return [Hit(hits[int(i)].row, s) for i, s in zip(order, scores, strict=True)]


class CostEstimate:
    """Seconds a re-rank of ``n`` pairs is expected to take: an exponentially weighted mean of the measured cost
    per pair (α 0.2) plus a fixed part, times a safety factor. Updated after every re-rank (thread-safe enough:
    a float swap under the GIL)."""

    def __init__(self, per_pair_s: float = 0.0, fixed_s: float = 0.0, safety: float = 1.5) -> None:
        self.per_pair_s, self.fixed_s, self.safety = per_pair_s, fixed_s, safety
        self._lock = threading.Lock()

    def seconds(self, n: int) -> float:
        return self.safety * (self.fixed_s + self.per_pair_s * n)

    def observe(self, n: int, seconds: float) -> None:
        if n <= 0:
            return
        with self._lock:
            per = max(0.0, seconds - self.fixed_s) / n
            self.per_pair_s = per if self.per_pair_s == 0.0 else 0.8 * self.per_pair_s + 0.2 * per


class Reranker:
    """The artifact's cross-encoder, the catalog titles and the serving depth: re-ranks the top of a hit list."""

    def __init__(self, root: Path, meta: dict[str, Any], titles: Sequence[str], depth: int,
                 intra_op_threads: int = 1) -> None:
        files = meta.get("files", {})
        path = root / str(files.get(SERVED_VARIANT, CROSS_ENCODER_FILES[SERVED_VARIANT]))
        tok = root / str(meta.get("tokenizer", CROSS_ENCODER_TOKENIZER))
        for p in (path, tok):
            if not p.is_file():
                raise ArtifactError(f"{root}: the manifest names a cross-encoder file {p.relative_to(root)} that is missing")
        self.model = CrossEncoder(path, tok, max_length=int(meta.get("max_length", DEFAULT_MAX_LENGTH)),
                                  intra_op_threads=intra_op_threads)
        self.meta = meta
        self.titles = titles
        self.depth = depth
        self.blend = float(meta.get("blend", 0.0))
        self.cost = CostEstimate()

    def warmup(self, rounds: int = 3) -> None:
        """Probes batch-exactness and measures the cost of a full-depth re-rank (the first cost estimate)."""
        self.model.probe_batch_exact()
        titles = [self.titles[i % len(self.titles)] for i in range(self.depth)]
        self.model.logits("warm up", titles[:2])
        t0 = time.perf_counter()
        for _ in range(rounds):
            self.model.logits("a warm-up query of a few words", titles)
        per_call = (time.perf_counter() - t0) / rounds
        self.cost.observe(len(titles), per_call)
        logger.info("cross-encoder %s: depth %d, blend %.2f, %.1f ms a re-rank at warm-up", self.model.model_path.name,
                    self.depth, self.blend, per_call * 1000)

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        """``hits`` with the top ``depth`` re-ordered by the cross-encoder (blended with the retrieval score)."""
        top = list(hits[: self.depth])
        if len(top) < 2:
            return list(hits)
        t0 = time.perf_counter()
        logits = self.model.logits(query, [self.titles[h.row] for h in top])
        self.cost.observe(len(top), time.perf_counter() - t0)
        order = rerank_order(logits, np.fromiter((h.score for h in top), dtype=np.float64, count=len(top)), self.blend)
        return reorder(top, order) + list(hits[self.depth:])
