"""Text -> L2-normalised sentence embedding with ONNX Runtime and `tokenizers` (no torch).

The same class embeds the catalog at export time and the queries at serving time, so both sides share
tokenisation, truncation, mean pooling and normalisation exactly (no train/serve skew).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def cuda_usable() -> bool:
    """True when onnxruntime offers CUDA *and* a GPU device node exists (ORT lists CUDA even without one)."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and os.path.exists("/dev/nvidiactl")


def _preload_cuda_libraries(ort: Any) -> None:
    """Loads CUDA/cuDNN from pip's ``nvidia`` packages beside onnxruntime (ORT >= 1.21; no-op otherwise), so the
    CUDA provider finds them without LD_LIBRARY_PATH. Missing libraries surface as the CPU fallback below."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - best effort: ORT itself reports what is missing
        logger.warning("could not preload CUDA libraries: %s", exc)


class Encoder:
    """Mean-pooled, L2-normalised BERT embeddings from an ONNX graph.

    ``provider`` is "auto" (CUDA when really usable, else CPU), "cpu" or "cuda". The provider actually in
    use after session creation is in :attr:`provider` (CUDA silently falls back to CPU inside ORT when its
    libraries are missing; we check).
    """

    def __init__(
        self,
        model_path: str | Path,
        tokenizer_path: str | Path,
        *,
        max_length: int = 64,
        provider: str = "cpu",
        intra_op_threads: int = 0,
        fixed_rows: int = 0,
        fixed_rows_on_cuda_only: bool = False,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path = Path(model_path)
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.no_padding()
        self._counter = Tokenizer.from_file(str(tokenizer_path))  # untruncated: to enforce request limits
        self._counter.no_truncation()
        self._counter.no_padding()
        opts = session_options(intra_op_threads)
        providers = [CUDA, CPU] if provider == "cuda" or (provider == "auto" and cuda_usable()) else [CPU]
        if CUDA in providers:
            _preload_cuda_libraries(ort)
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._output_name = self.session.get_outputs()[0].name
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        # Fixed shapes: every run is (fixed_rows, max_length), padded with empty rows. The same shape means the
        # same kernels, so a row's result cannot depend on its batch mates (GPU GEMMs pick tiling by shape).
        use_fixed = fixed_rows > 0 and (self.provider == CUDA or not fixed_rows_on_cuda_only)
        self.fixed_rows = fixed_rows if use_fixed else 0
        logger.info("encoder %s on %s (max_length=%d, dim=%d)", self.model_path.name, self.provider, max_length, self.dim)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens or truncation."""
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def tokenize(self, texts: Sequence[str], rows: int = 0, width: int = 0) -> dict[str, np.ndarray]:
        """Tokenises and right-pads to the longest text of the batch (or to ``width``); ``rows`` > len(texts)
        adds rows holding an empty text ([CLS] [SEP])."""
        encs = self.tokenizer.encode_batch(list(texts) + [""] * max(0, rows - len(texts)))
        width = width or max(1, max(len(e.ids) for e in encs))
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for row, enc in enumerate(encs):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds ``texts`` as one batch: float32 (len(texts), dim), rows L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.fixed_rows:
            n = self.fixed_rows
            return np.concatenate([self._encode(texts[i : i + n], rows=n, width=self.max_length) for i in range(0, len(texts), n)])
        return self._encode(texts)

    def _encode(self, texts: Sequence[str], rows: int = 0, width: int = 0) -> np.ndarray:
        feeds = self.tokenize(texts, rows=rows, width=width)
        if self.provider == CUDA:
            hidden = self._run_bound(feeds)
        else:
            hidden = self.session.run(None, feeds)[0]
        return mean_pool_normalize(hidden.astype(np.float32, copy=False), feeds["attention_mask"])[: len(texts)]

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """CUDA: I/O binding, so inputs go to the device once and the output comes back once, without the
        extra staging copies of ``session.run``."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self._output_name, "cpu")
        self.session.run_with_iobinding(binding)
        out: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return out

    def encode_many(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embeds many texts in length-sorted batches (less padding); rows returned in input order."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"embed ({self.model_path.stem})", unit="batch")
        for start in starts:
            rows = order[start : start + batch_size]
            out[rows] = self.encode([texts[i] for i in rows])
        return out

    def warmup(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.encode(["warm up the encoder", "a second, somewhat longer warm-up sentence for padding"])


def session_options(intra_op_threads: int = 0) -> Any:
    """ORT options of every served graph: all graph optimisations, sequential, one inter-op thread,
    ``intra_op_threads`` per run (0 = ORT's default), warnings off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of token vectors under the attention mask, then L2 normalisation (sentence-transformers style)."""
    m = mask[..., None].astype(np.float32)
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    out: np.ndarray = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
    return out
