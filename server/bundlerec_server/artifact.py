"""The versioned artifact folder: its fixed file names, its manifest, and loading it with verification.

Layout (every path relative to the artifact folder; all written by ``bundlerec-export``)::

    manifest.json          format version, provenance, parameters, sha256 of every other file
    model/tokenizer.json   Hugging Face `tokenizers` file used by both export and server
    model/fp32.onnx        encoder, float32 (used to embed the catalog)
    model/int8.onnx        encoder, Optimum dynamic int8 per-channel (per-tensor activation scale)
    model/int8_pertoken.onnx  encoder, per-token dynamic int8: batch-exact, CPU serving with micro-batching
    model/fp16.onnx        encoder, float16 with float32 I/O (CUDA serving)
    items.jsonl            one item per line, in index order: id, title, category, price, quality, orders
    embeddings.npy         float32 (n_items, dim), L2-normalised, row i = item i
    index.hnsw             hnswlib index over embeddings (space "cosine", label i = item i)
    complements.npz        CSR item->complement lists: indptr, indices, strength, support
    lexical/               optional bm25s index over titles (hybrid retrieval)

The server refuses an artifact whose manifest is missing, has another format version, lists a file
that is missing or whose checksum differs, or whose arrays disagree with the declared dimensions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "model/tokenizer.json"
MODEL_FILES = {
    "fp32": "model/fp32.onnx", "int8": "model/int8.onnx", "int8_pertoken": "model/int8_pertoken.onnx",
    "fp16": "model/fp16.onnx",
}
ITEMS = "items.jsonl"
EMBEDDINGS = "embeddings.npy"
INDEX = "index.hnsw"
COMPLEMENTS = "complements.npz"
LEXICAL_DIR = "lexical"


class ArtifactError(Exception):
    """The artifact folder is missing, corrupt or incompatible with this server."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksum_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Adds format version and file checksums to ``manifest`` and writes it; returns what was written."""
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=checksum_tree(root))
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(root / MANIFEST)
    return manifest


def read_manifest(root: Path, verify: bool = True) -> dict[str, Any]:
    """Reads ``manifest.json`` and (by default) checks the format version and every file's checksum."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}: not an artifact folder")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r}, this server reads {FORMAT_VERSION}"
        )
    if verify:
        files = manifest.get("files") or {}
        for rel in (TOKENIZER, ITEMS, EMBEDDINGS, INDEX, COMPLEMENTS):
            if rel not in files:
                raise ArtifactError(f"{path}: required file {rel} not listed")
        for rel, expected in files.items():
            fpath = Path(root) / rel
            if not fpath.is_file():
                raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing")
            actual = sha256_file(fpath)
            if actual != expected:
                raise ArtifactError(f"{root}: checksum mismatch for {rel} (manifest {expected[:12]}…, file {actual[:12]}…)")
    return manifest


@dataclass(frozen=True)
class ItemTable:
    """Catalog metadata in index order (row i = hnsw label i)."""

    ids: list[str]
    titles: list[str]
    categories: list[str]
    prices: np.ndarray  # float64, NaN where unknown
    quality: np.ndarray  # float32 in (0, 1]
    orders: np.ndarray  # int32, baskets containing the item (0 without order data)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, path: Path) -> ItemTable:
        ids, titles, cats, prices, quality, orders = [], [], [], [], [], []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                ids.append(row["id"])
                titles.append(row["title"])
                cats.append(row.get("category") or "")
                price = row.get("price")
                prices.append(np.nan if price is None else float(price))
                quality.append(float(row.get("quality", 1.0)))
                orders.append(int(row.get("orders", 0)))
        return cls(
            ids, titles, cats, np.asarray(prices, dtype=np.float64), np.asarray(quality, dtype=np.float32),
            np.asarray(orders, dtype=np.int32),
        )

    def write(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            for i, item_id in enumerate(self.ids):
                price = None if np.isnan(self.prices[i]) else round(float(self.prices[i]), 2)
                row = {
                    "id": item_id, "title": self.titles[i], "category": self.categories[i], "price": price,
                    "quality": round(float(self.quality[i]), 6), "orders": int(self.orders[i]),
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Complements:
    """CSR adjacency: complements of row i are ``indices[indptr[i]:indptr[i+1]]``, best first."""

    indptr: np.ndarray  # int64 (n_items + 1)
    indices: np.ndarray  # int32
    strength: np.ndarray  # float32 in [0, 1]: normalised association strength
    support: np.ndarray  # int32: baskets containing both (0 for content-based fallbacks)

    def of(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.indptr[row], self.indptr[row + 1]
        return self.indices[lo:hi], self.strength[lo:hi], self.support[lo:hi]

    def top_strength(self, row: int) -> float:
        """Strength of the row's strongest complement (0 when it has none)."""
        lo, hi = self.indptr[row], self.indptr[row + 1]
        return float(self.strength[lo]) if hi > lo else 0.0

    @classmethod
    def read(cls, path: Path) -> Complements:
        with np.load(path) as z:
            return cls(z["indptr"], z["indices"], z["strength"], z["support"])

    def write(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, indptr=self.indptr, indices=self.indices, strength=self.strength, support=self.support)
