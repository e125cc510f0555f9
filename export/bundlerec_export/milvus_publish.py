"""Publishes an artifact's vectors to Milvus, for the server's ``--vector-backend milvus://...``.

    python -m bundlerec_export.milvus_publish --artifact artifacts/demo --uri milvus://127.0.0.1:19530
    bundlerec-export ... --publish-milvus milvus://127.0.0.1:19530      (after the build)

One collection per artifact version (``bundlerec_<version>``, sanitised): the row id (primary key, = the
hnswlib label and the catalog row), the L2-normalised vector, the fields the request filters need (category
code and name, price — null when unknown — and item id) and the version. An HNSW (or HNSW_SQ) COSINE index,
built with the artifact's M / ef_construction. Then the alias (default ``bundlerec_current``) is pointed at it
in one step, so servers reloading onto this version find it; collections of older versions are left for the
servers still serving them (drop them with ``--drop-others`` once every server has moved on).

Idempotent: a complete collection of the same version (row count, dimension, version field) is kept as it is
and only the alias is (re)pointed; an incomplete one is dropped and written again. The same code talks to
Milvus Lite (``python -m milvus_lite server``) and to a Milvus cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundlerec_server import artifact as A
from bundlerec_server.catalog import Catalog
from bundlerec_server.vectors import (
    COLLECTION_PREFIX,
    F_CATEGORY,
    F_CATEGORY_NAME,
    F_ITEM,
    F_PRICE,
    F_ROW,
    F_VECTOR,
    F_VERSION,
    MilvusTarget,
    collection_name,
    collection_problem,
)

logger = logging.getLogger(__name__)

INDEX_TYPES = ("HNSW", "HNSW_SQ")
BATCH_ROWS = 2_000  # rows per insert (384-d: ~3 MB a message)


@dataclass(frozen=True)
class Published:
    collection: str
    alias: str
    rows: int
    written: bool  # False: the collection was already complete (no-op)
    seconds: float


def publish(root: Path, uri: str, *, index_type: str = "HNSW", drop_others: bool = False) -> Published:
    """Writes artifact ``root`` into its version's collection (unless already complete) and points the alias
    of ``uri`` at it."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type {index_type!r} is not one of {INDEX_TYPES}")
    t0 = time.perf_counter()
    target = MilvusTarget.parse(uri)
    manifest = A.read_manifest(root)
    version, dim = str(manifest["artifact_version"]), int(manifest["embedding_dim"])
    catalog = Catalog.from_table(A.ItemTable.read(root / A.ITEMS))
    emb = np.load(root / A.EMBEDDINGS, mmap_mode="r")
    if emb.shape != (len(catalog), dim):
        raise A.ArtifactError(f"{root}: embeddings.npy shape {emb.shape}, expected {(len(catalog), dim)}")
    name = collection_name(version)
    client = target.client()
    try:
        problem = collection_problem(client, name, version, dim, len(catalog))
        written = problem is not None
        if written:
            if client.has_collection(name):
                logger.info("%s: writing it again", problem)
                client.drop_collection(name)
            _create(client, name, version, dim, manifest.get("index", {}), index_type)
            _insert(client, name, version, catalog, emb)
            client.flush(name)
        client.load_collection(name)
        _point_alias(client, target.alias, name)
        if drop_others:
            _drop_others(client, name)
    finally:
        client.close()
    done = Published(name, target.alias, len(catalog), written, time.perf_counter() - t0)
    logger.info("Milvus %s: %s %s (%d rows, %.1f s); alias %s -> %s", target.uri,
                "wrote" if written else "kept complete", name, done.rows, done.seconds, target.alias, name)
    return done


def _create(client: Any, name: str, version: str, dim: int, index: dict[str, Any], index_type: str) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=f"bundlerec artifact {version}")
    schema.add_field(F_ROW, DataType.INT64, is_primary=True)
    schema.add_field(F_VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field(F_CATEGORY, DataType.INT32)
    schema.add_field(F_CATEGORY_NAME, DataType.VARCHAR, max_length=1024)
    schema.add_field(F_PRICE, DataType.DOUBLE, nullable=True)
    schema.add_field(F_ITEM, DataType.VARCHAR, max_length=1024)
    schema.add_field(F_VERSION, DataType.VARCHAR, max_length=512)
    params: dict[str, Any] = {"M": int(index.get("M", 16)), "efConstruction": int(index.get("ef_construction", 200))}
    if index_type == "HNSW_SQ":
        params["sq_type"] = "SQ8"
    index_params = client.prepare_index_params()
    index_params.add_index(F_VECTOR, index_type=index_type, metric_type="COSINE", params=params)
    index_params.add_index(F_CATEGORY, index_type="INVERTED")
    client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")


def _insert(client: Any, name: str, version: str, catalog: Catalog, emb: np.ndarray) -> None:
    for start in range(0, len(catalog), BATCH_ROWS):
        stop = min(start + BATCH_ROWS, len(catalog))
        vectors = np.asarray(emb[start:stop], dtype=np.float32)
        client.insert(name, [
            {F_ROW: i, F_VECTOR: vectors[i - start].tolist(), F_CATEGORY: int(catalog.category_codes[i]),
             F_CATEGORY_NAME: catalog.category_lower[i], F_PRICE: _price(catalog.prices[i]), F_ITEM: catalog.ids[i],
             F_VERSION: version}
            for i in range(start, stop)
        ])


def _price(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _point_alias(client: Any, alias: str, name: str) -> None:
    """``alias`` -> ``name`` in one step (created if new, altered if it points elsewhere)."""
    if alias in client.list_aliases().get("aliases", []):
        if client.describe_alias(alias)["collection_name"] != name:
            client.alter_alias(name, alias)
    else:
        client.create_alias(name, alias)


def _drop_others(client: Any, keep: str) -> None:
    for other in client.list_collections():
        if other != keep and other.startswith(COLLECTION_PREFIX):
            for alias in client.list_aliases(other).get("aliases", []):
                client.drop_alias(alias)
            client.drop_collection(other)
            logger.info("dropped collection %s", other)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bundlerec_export.milvus_publish",
                                description="Publish an artifact's vectors to Milvus and point the alias at them.")
    p.add_argument("--artifact", required=True, type=Path, help="artifact folder")
    p.add_argument("--uri", required=True, help="milvus://host:port[?alias=NAME] (token in BUNDLEREC_MILVUS_TOKEN)")
    p.add_argument("--index-type", choices=INDEX_TYPES, default="HNSW", help="HNSW (fp32) or HNSW_SQ (SQ8 vectors)")
    p.add_argument("--drop-others", action="store_true", help="drop the collections of other versions afterwards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        done = publish(args.artifact, args.uri, index_type=args.index_type, drop_others=args.drop_others)
    except (A.ArtifactError, ValueError) as exc:
        print(f"milvus_publish: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'published' if done.written else 'already published'} {done.collection} ({done.rows} rows, "
          f"{done.seconds:.1f} s); alias {done.alias} -> {done.collection}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
