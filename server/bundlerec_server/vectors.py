"""Dense retrieval behind one small interface: :class:`VectorIndex` ``search(vec, k, allowed, floor) -> hits``.

Two implementations:

* :class:`HnswVectors` (default, ``--vector-backend hnsw``): the artifact's hnswlib index in this process,
  over-fetching until enough rows pass the filter, and exact brute force over small included categories.
* :class:`MilvusVectors` (``--vector-backend milvus://host:port[?alias=...]``): a Milvus collection written by
  ``bundlerec-export --publish-milvus`` (:mod:`bundlerec_export.milvus_publish`), one collection per artifact
  version behind an alias. The request's :class:`RowFilter` becomes a Milvus boolean expression, so filtering
  is exact and happens in Milvus. The engine resolves the alias once, at load, refuses a collection of another
  version or dimension, and then searches the concrete collection (never the alias), checking the version field
  of every hit: a call never mixes versions, even while the alias is repointed and the server reloads.

Both score a hit as cosine x the catalog's quality prior, as the engine always has.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import hnswlib
import numpy as np

from .artifact import ArtifactError
from .catalog import Catalog
from .domain import Hit
from .filters import RowFilter
from .fusion import top_hits

logger = logging.getLogger(__name__)

BRUTE_FORCE_MAX_ROWS = 20_000  # restricted to categories this small, exact search beats over-fetching HNSW
DEFAULT_ALIAS = "bundlerec_current"
COLLECTION_PREFIX = "bundlerec_"
TOKEN_ENV = "BUNDLEREC_MILVUS_TOKEN"  # user:password or API key of a secured Milvus (never in the URI)
MILVUS_MAX_TOPK = 16_384  # Milvus refuses a larger limit
MAX_EF = 32_768  # widest HNSW beam asked for (a very selective filter)
CONNECT_TIMEOUT_S = 10.0
# the collection's fields (bundlerec_export.milvus_publish writes them)
F_ROW, F_VECTOR, F_CATEGORY, F_CATEGORY_NAME, F_PRICE, F_ITEM, F_VERSION = (
    "row", "vector", "category", "category_name", "price", "item_id", "version")


class VectorIndex(Protocol):
    """Dense top-k by cosine x quality among the rows ``allowed`` lets through, with cosine >= ``floor``; ``beam``
    widens this search's HNSW beam (0: the index's ef)."""

    def search(self, vec: np.ndarray, k: int, allowed: RowFilter, floor: float = -1.0, beam: int = 0) -> list[Hit]: ...

    def describe(self) -> str: ...


class VersionMismatch(RuntimeError):
    """Milvus returned rows of another artifact version than the engine serves (never expected)."""


def _ranked(rows: np.ndarray, sims: np.ndarray, quality: np.ndarray, k: int) -> list[Hit]:
    return top_hits(rows, sims * quality[rows], k)


class HnswVectors:
    """The artifact's hnswlib index, in process."""

    def __init__(self, index_path: Path, embeddings: np.ndarray, quality: np.ndarray, ef: int, anchor_pool: int) -> None:
        n, dim = embeddings.shape
        self.embeddings, self.quality, self.anchor_pool = embeddings, quality, anchor_pool
        self.index = hnswlib.Index(space="cosine", dim=dim)
        self.index.load_index(str(index_path), max_elements=n)
        if self.index.get_current_count() != n:
            raise ArtifactError(f"{index_path}: index holds {self.index.get_current_count()} items, catalog {n}")
        self.index.set_ef(max(ef, anchor_pool))

    def describe(self) -> str:
        return "hnswlib (in process)"

    def set_ef(self, ef: int) -> None:
        """The beam width of later searches (hnswlib searches with at least the k asked for)."""
        self.index.set_ef(ef)

    def search(self, vec: np.ndarray, k: int, allowed: RowFilter, floor: float = -1.0, beam: int = 0) -> list[Hit]:
        n = len(self.embeddings)
        rows = allowed.category_rows()
        if rows is not None and len(rows) <= BRUTE_FORCE_MAX_ROWS:
            rows = rows[allowed.anchors(rows)]
            sims = np.asarray(self.embeddings[rows], dtype=np.float32) @ vec
            relevant = sims >= floor
            return _ranked(rows[relevant], sims[relevant], self.quality, k)
        fetch = min(n, max(k, self.anchor_pool, beam))  # hnswlib's beam is max(ef, k): a wider one costs no set_ef
        while True:
            labels, dists = self.index.knn_query(vec, k=fetch)
            rows = labels[0].astype(np.int64)
            sims = 1.0 - dists[0]
            keep = allowed.anchors(rows)
            relevant = sims >= floor
            if keep.sum() >= k or fetch >= n or not relevant[-1]:
                keep &= relevant
                return _ranked(rows[keep], sims[keep], self.quality, k)
            fetch = min(n, fetch * 4)


# --- Milvus ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusTarget:
    """Where the collections live: ``milvus://host:port[?alias=A&db=D&secure=1]`` (or ``http(s)://host:port``)."""

    uri: str  # what MilvusClient takes: http(s)://host:port
    alias: str = DEFAULT_ALIAS
    db: str = ""

    @classmethod
    def parse(cls, value: str) -> MilvusTarget:
        parts = urlsplit(value)
        if parts.scheme not in ("milvus", "http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"vector backend {value!r}: expected milvus://host:port[?alias=NAME] (or hnsw)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"alias", "db", "secure"}
        if unknown:
            raise ValueError(f"vector backend {value!r}: unknown option(s) {sorted(unknown)} (alias, db, secure)")
        secure = parts.scheme == "https" or query.get("secure", "") in ("1", "true", "yes")
        alias = query.get("alias", DEFAULT_ALIAS)
        if not _NAME.fullmatch(alias):
            raise ValueError(f"vector backend {value!r}: alias {alias!r} is not a valid Milvus name")
        return cls(f"{'https' if secure else 'http'}://{parts.hostname}:{parts.port}", alias, query.get("db", ""))

    def client(self, timeout: float = CONNECT_TIMEOUT_S) -> Any:
        """A connected ``MilvusClient`` (ArtifactError when Milvus cannot be reached)."""
        try:
            from pymilvus import MilvusClient
        except ImportError as exc:
            raise ArtifactError("the Milvus vector backend needs pymilvus (pip install pymilvus)") from exc
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": timeout}
        if os.environ.get(TOKEN_ENV):
            kwargs["token"] = os.environ[TOKEN_ENV]
        if self.db:
            kwargs["db_name"] = self.db
        try:
            return MilvusClient(**kwargs)
        except Exception as exc:  # pymilvus raises MilvusException or grpc errors for an unreachable server
            raise ArtifactError(f"cannot reach Milvus at {self.uri}: {exc}") from exc


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def collection_name(version: str, prefix: str = COLLECTION_PREFIX) -> str:
    """The Milvus collection of an artifact version: letters, digits and underscores, at most 255."""
    return (prefix + re.sub(r"[^A-Za-z0-9_]", "_", version))[:255]


def milvus_expr(allowed: RowFilter) -> str:
    """``allowed``'s anchor rule (:meth:`RowFilter.anchors`) as a Milvus boolean expression ('' = no filter):
    included categories, excluded categories, excluded rows, and a price cap that an unknown price passes."""
    terms = []
    if allowed.included is not None:
        terms.append(f"{F_CATEGORY} in {_ints(np.flatnonzero(allowed.included))}")
    if not allowed.not_excluded.all():
        terms.append(f"{F_CATEGORY} not in {_ints(np.flatnonzero(~allowed.not_excluded))}")
    if allowed.excluded is not None:
        terms.append(f"{F_ROW} not in {_ints(np.flatnonzero(allowed.excluded))}")
    if allowed.max_price is not None:
        terms.append(f"({F_PRICE} is null or {F_PRICE} <= {float(allowed.max_price)!r})")
    return " and ".join(terms)


def collection_problem(client: Any, name: str, version: str, dim: int, count: int) -> str | None:
    """Why collection ``name`` is not a complete copy of artifact ``version`` (``dim``, ``count`` rows), or None.
    Loads the collection (a query needs it loaded)."""
    if not client.has_collection(name):
        return f"collection {name!r} does not exist"
    vec = next((f for f in client.describe_collection(name)["fields"] if f["name"] == F_VECTOR), None)
    have_dim = int(vec["params"]["dim"]) if vec else -1
    if have_dim != dim:
        return f"collection {name!r} has dimension {have_dim}, artifact {version} has {dim}"
    client.load_collection(name)
    rows = client.query(name, filter="", output_fields=["count(*)"])
    have = int(rows[0]["count(*)"]) if rows else 0
    if have != count:
        return f"collection {name!r} holds {have} rows, artifact {version} has {count}"
    first = client.query(name, filter=f"{F_ROW} == 0", output_fields=[F_VERSION])
    if not first or first[0][F_VERSION] != version:
        return f"collection {name!r} is not artifact {version}'s (version field {first[0][F_VERSION] if first else None!r})"
    return None


def _ints(values: np.ndarray) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


class Selectivity:
    """Estimates the fraction of the catalog a filter lets through (category counts, price quantiles), so that a
    filtered HNSW search can widen its beam in proportion: Milvus walks the graph past filtered-out nodes, and a
    beam of ``ef`` finds about ``ef x fraction`` passing ones."""

    def __init__(self, category_codes: np.ndarray, prices: np.ndarray) -> None:
        self.n = max(1, len(category_codes))
        self.per_category = np.bincount(category_codes).astype(np.float64)
        known = prices[~np.isnan(prices)]
        self.sorted_prices, self.unknown_prices = np.sort(known), len(prices) - len(known)

    def __call__(self, allowed: RowFilter) -> float:
        categories = allowed.not_excluded if allowed.included is None else allowed.included & allowed.not_excluded
        fraction = float(self.per_category[categories[: len(self.per_category)]].sum()) / self.n
        if allowed.max_price is not None:
            cheap = int(np.searchsorted(self.sorted_prices, allowed.max_price, side="right"))
            fraction *= (cheap + self.unknown_prices) / self.n  # unknown prices pass
        return fraction


class MilvusVectors:
    """An artifact version's collection in Milvus, resolved through the alias once (at load)."""

    def __init__(self, target: MilvusTarget, version: str, catalog: Catalog, ef: int, anchor_pool: int, dim: int,
                 timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.target, self.version, self.quality, self.ef, self.anchor_pool = target, version, catalog.quality, ef, anchor_pool
        self.count = count = len(catalog)
        self.selectivity = Selectivity(catalog.category_codes, catalog.prices)
        self.client = target.client(timeout_s)
        weakref.finalize(self, self.client.close)
        try:
            self.collection = self._resolve(dim, count)
        except ArtifactError:
            self.client.close()
            raise
        except Exception as exc:
            self.client.close()
            raise ArtifactError(f"Milvus at {target.uri}: {exc}") from exc

    def _resolve(self, dim: int, count: int) -> str:
        """The concrete collection behind the alias; refused unless it holds this version, dimension and size."""
        c, alias, wanted = self.client, self.target.alias, collection_name(self.version)
        if alias not in c.list_aliases().get("aliases", []):
            raise ArtifactError(f"Milvus at {self.target.uri} has no alias {alias!r}: publish artifact {self.version} "
                                f"with bundlerec-export --publish-milvus first")
        name = str(c.describe_alias(alias)["collection_name"])
        if name != wanted:
            raise ArtifactError(f"Milvus alias {alias!r} points at collection {name!r}, not {wanted!r} of artifact "
                                f"{self.version}: publish this artifact (it repoints the alias) or serve the other one")
        problem = collection_problem(c, name, self.version, dim, count)
        if problem:
            raise ArtifactError(f"Milvus {problem}")
        return name

    def describe(self) -> str:
        return f"Milvus {self.target.uri} collection {self.collection} (alias {self.target.alias})"

    def search(self, vec: np.ndarray, k: int, allowed: RowFilter, floor: float = -1.0, beam: int = 0) -> list[Hit]:
        fetch = min(self.count, max(k, self.anchor_pool), MILVUS_MAX_TOPK)
        expr = milvus_expr(allowed)
        ef = max(self.ef, fetch, beam)
        if expr:  # a beam wide enough to meet ``ef`` passing rows (x2 margin): the top k of brute force
            ef = int(min(MAX_EF, self.count, max(ef, 2 * ef / max(self.selectivity(allowed), 1e-6))))
        res = self.client.search(
            self.collection, data=[np.asarray(vec, dtype=np.float32).tolist()], limit=fetch, filter=expr,
            output_fields=[F_VERSION], search_params={"metric_type": "COSINE", "params": {"ef": ef}},
        )
        hits = res[0]
        if any(h["entity"][F_VERSION] != self.version for h in hits):
            raise VersionMismatch(f"collection {self.collection} returned rows of another version than {self.version}")
        rows = np.fromiter((h[F_ROW] for h in hits), dtype=np.int64, count=len(hits))
        sims = np.fromiter((h["distance"] for h in hits), dtype=np.float32, count=len(hits))
        relevant = sims >= floor
        return _ranked(rows[relevant], sims[relevant], self.quality, k)


def open_vectors(backend: str, *, index_path: Path, version: str, embeddings: np.ndarray, catalog: Catalog, ef: int,
                 anchor_pool: int) -> VectorIndex:
    """The dense index ``backend`` names: ``hnsw`` (the artifact's file) or ``milvus://...``."""
    if backend in ("", "hnsw"):
        return HnswVectors(index_path, embeddings, catalog.quality, ef, anchor_pool)
    return MilvusVectors(MilvusTarget.parse(backend), version, catalog, ef, anchor_pool, dim=embeddings.shape[1])


def check_backend(value: str) -> None:
    """ValueError unless ``value`` is a vector backend this server knows (settings check at start)."""
    if value not in ("", "hnsw"):
        MilvusTarget.parse(value)
