"""Dataset adapters: every source becomes one in-memory :class:`Dataset`.

Common form
    items: :class:`Item` (id: str, title, category or "", price or None), in file order
    baskets: list of :class:`Basket` (basket_id, user_id or "", [item ids]), or empty when the source has none

Adapters (``load_dataset(name, ...)``)
    ``instacart``  DIR/products.csv (product_id, product_name, aisle, department) -> category = aisle;
                   baskets from DIR/orders.csv (order_id, user_id, ...) + DIR/order_items.csv (order_id, product_id, ...)
    ``homedepot``  DIR/products.csv (product_id, title); no category, price or baskets
    ``icecat``     DIR/products.jsonl ({id, title, description, brand, price}); price kept, no category or baskets
    ``csv``        a generic catalog CSV with columns ``id,title[,category][,price]``
    ``jsonl``      a generic catalog JSON-lines file with keys ``id,title[,category][,price]``
                   both optionally with an orders CSV ``basket_id,item_id[,user_id]`` (one row per basket line)

Errors (:class:`DatasetError`) name the file and, where it applies, the line: missing columns, an empty
catalog, duplicate ids, malformed JSON or prices. Items whose title is empty are skipped and counted
(``Dataset.skipped_empty_title``, logged as a warning). Basket lines that name unknown items are dropped and
counted (``Dataset.dropped_basket_lines``); a basket left empty is dropped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATASETS = ("instacart", "homedepot", "icecat", "csv", "jsonl")


class DatasetError(Exception):
    """The input data is missing, malformed or inconsistent (the message names file and line)."""


@dataclass(frozen=True)
class Item:
    id: str
    title: str
    category: str = ""
    price: float | None = None


@dataclass(frozen=True)
class Basket:
    basket_id: str
    user_id: str
    items: list[str]
    order_number: int = 0  # position in the shopper's history (instacart orders.csv), 0 when unknown


@dataclass
class Source:
    path: str
    sha256: str
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "rows": self.rows}


@dataclass
class Dataset:
    name: str
    items: list[Item]
    baskets: list[Basket] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    skipped_empty_title: int = 0
    dropped_basket_lines: int = 0

    @property
    def has_baskets(self) -> bool:
        return bool(self.baskets)

    @property
    def has_categories(self) -> bool:
        return any(it.category for it in self.items)


# ---------------------------------------------------------------------------------------------- readers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return path


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, row) of a CSV with a header; checks the required columns first."""
    _require_file(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{path}:1: empty file (no header row)")
        header = [h.strip() for h in header]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        for row in reader:
            yield reader.line_num, row


def _parse_price(raw: Any, path: Path, line: int) -> float | None:
    """``raw``: a CSV cell or a JSON value."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return None
    try:
        price = float(raw)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}:{line}: price {raw!r} is not a number") from None
    if not math.isfinite(price) or price < 0:
        raise DatasetError(f"{path}:{line}: price {raw!r} is not a finite non-negative number")
    return price


class _ItemCollector:
    def __init__(self, path: Path, limit: int | None) -> None:
        self.path = path
        self.limit = limit
        self.items: list[Item] = []
        self.first_line: dict[str, int] = {}
        self.skipped = 0
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.items) >= self.limit

    def add(self, line: int, raw_id: object, raw_title: object, category: object = "", price: float | None = None) -> None:
        self.rows += 1
        item_id = "" if raw_id is None else str(raw_id).strip()
        if not item_id:
            raise DatasetError(f"{self.path}:{line}: empty item id")
        if item_id in self.first_line:
            raise DatasetError(
                f"{self.path}:{line}: duplicate item id {item_id!r} (first seen on line {self.first_line[item_id]})"
            )
        self.first_line[item_id] = line
        title = " ".join(str(raw_title or "").split())
        if not title:
            self.skipped += 1
            return
        if self.full:
            return
        self.items.append(Item(item_id, title, " ".join(str(category or "").split()), price))

    def finish(self) -> tuple[list[Item], int]:
        if not self.items:
            raise DatasetError(f"{self.path}: empty catalog (no item with a non-empty title)")
        if self.skipped:
            logger.warning("%s: skipped %d item(s) with an empty title", self.path, self.skipped)
        return self.items, self.skipped


def read_catalog_csv(
    path: Path, id_col: str = "id", title_col: str = "title", category_col: str | None = "category",
    price_col: str | None = "price", limit: int | None = None,
) -> tuple[list[Item], int, int]:
    """Catalog CSV -> (items, skipped_empty_title, rows). Category/price columns are optional."""
    path = Path(path)
    col = _ItemCollector(path, limit)
    header_checked = False
    for line, row in _csv_rows(path, (id_col, title_col)):
        if not header_checked:
            category_col = category_col if category_col in row else None
            price_col = price_col if price_col in row else None
            header_checked = True
        col.add(
            line, row.get(id_col), row.get(title_col),
            row.get(category_col) if category_col else "",
            _parse_price(row.get(price_col), path, line) if price_col else None,
        )
    items, skipped = col.finish()
    return items, skipped, col.rows


def read_catalog_jsonl(
    path: Path, id_key: str = "id", title_key: str = "title", category_key: str | None = "category",
    price_key: str | None = "price", limit: int | None = None,
) -> tuple[list[Item], int, int]:
    """Catalog JSON lines -> (items, skipped_empty_title, rows). Blank lines are ignored."""
    path = Path(_require_file(Path(path)))
    col = _ItemCollector(path, limit)
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in (id_key, title_key) if k not in obj]
            if missing:
                raise DatasetError(f"{path}:{line}: missing key(s) {', '.join(missing)}")
            cat = obj.get(category_key) if category_key else ""
            price = _parse_price(obj.get(price_key), path, line) if price_key else None
            col.add(line, obj[id_key], obj[title_key], cat or "", price)
    items, skipped = col.finish()
    return items, skipped, col.rows


def read_orders_csv(
    path: Path, known: set[str], basket_col: str = "basket_id", item_col: str = "item_id", user_col: str = "user_id",
) -> tuple[list[Basket], int, int]:
    """Generic orders CSV (basket_id,item_id[,user_id]) -> (baskets, dropped lines, rows)."""
    path = Path(path)
    baskets: dict[str, list[str]] = {}
    users: dict[str, str] = {}
    dropped = rows = 0
    for line, row in _csv_rows(path, (basket_col, item_col)):
        rows += 1
        bid = (row.get(basket_col) or "").strip()
        iid = (row.get(item_col) or "").strip()
        if not bid or not iid:
            raise DatasetError(f"{path}:{line}: empty {basket_col} or {item_col}")
        if iid not in known:
            dropped += 1
            continue
        baskets.setdefault(bid, []).append(iid)
        if bid not in users:
            users[bid] = (row.get(user_col) or "").strip()
    return [Basket(b, users.get(b, ""), _dedup(v)) for b, v in baskets.items()], dropped, rows


def _dedup(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _finish(name: str, items: list[Item], skipped: int, baskets: list[Basket], dropped: int,
            sources: list[Source]) -> Dataset:
    if dropped:
        logger.warning("%s: dropped %d basket line(s) naming items outside the catalog", name, dropped)
    ds = Dataset(name, items, [b for b in baskets if b.items], sources, skipped, dropped)
    logger.info(
        "dataset %s: %d items (%d skipped, empty title), %d baskets", name, len(items), skipped, len(ds.baskets)
    )
    return ds


# --------------------------------------------------------------------------------------------- adapters


def load_instacart(data_dir: Path, limit: int | None = None) -> Dataset:
    data_dir = Path(data_dir)
    products, orders, order_items = (data_dir / f for f in ("products.csv", "orders.csv", "order_items.csv"))
    items, skipped, rows = read_catalog_csv(
        products, id_col="product_id", title_col="product_name", category_col="aisle", price_col=None, limit=limit
    )
    sources = [Source(str(products), _sha256(products), rows)]
    known = {it.id for it in items}
    users: dict[str, str] = {}
    numbers: dict[str, int] = {}
    n_orders = 0
    for line, row in _csv_rows(orders, ("order_id", "user_id")):
        n_orders += 1
        oid = (row["order_id"] or "").strip()
        if not oid:
            raise DatasetError(f"{orders}:{line}: empty order_id")
        users[oid] = (row["user_id"] or "").strip()
        numbers[oid] = _int_or_zero(row.get("order_number"))
    sources.append(Source(str(orders), _sha256(orders), n_orders))
    baskets, dropped, n_lines = read_orders_csv(order_items, known, basket_col="order_id", item_col="product_id")
    sources.append(Source(str(order_items), _sha256(order_items), n_lines))
    baskets = [Basket(b.basket_id, users.get(b.basket_id, ""), b.items, numbers.get(b.basket_id, 0)) for b in baskets]
    return _finish("instacart", items, skipped, baskets, dropped, sources)


def _int_or_zero(value: str | None) -> int:
    try:
        return int(float(value or 0))
    except ValueError:
        return 0


def load_homedepot(data_dir: Path, limit: int | None = None) -> Dataset:
    path = Path(data_dir) / "products.csv"
    items, skipped, rows = read_catalog_csv(
        path, id_col="product_id", title_col="title", category_col=None, price_col=None, limit=limit
    )
    return _finish("homedepot", items, skipped, [], 0, [Source(str(path), _sha256(path), rows)])


def load_icecat(data_dir: Path, limit: int | None = None) -> Dataset:
    path = Path(data_dir) / "products.jsonl"
    items, skipped, rows = read_catalog_jsonl(path, category_key=None, price_key="price", limit=limit)
    return _finish("icecat", items, skipped, [], 0, [Source(str(path), _sha256(path), rows)])


def load_generic(catalog: Path, orders: Path | None = None, fmt: str | None = None, limit: int | None = None) -> Dataset:
    catalog = Path(catalog)
    fmt = fmt or ("jsonl" if catalog.suffix.lower() in (".jsonl", ".ndjson") else "csv")
    reader = read_catalog_jsonl if fmt == "jsonl" else read_catalog_csv
    items, skipped, rows = reader(catalog, limit=limit)
    sources = [Source(str(catalog), _sha256(catalog), rows)]
    baskets: list[Basket] = []
    dropped = 0
    if orders is not None:
        orders = Path(orders)
        baskets, dropped, n = read_orders_csv(orders, {it.id for it in items})
        sources.append(Source(str(orders), _sha256(orders), n))
    return _finish(fmt, items, skipped, baskets, dropped, sources)


def load_dataset(
    name: str, data_dir: Path | None = None, catalog: Path | None = None, orders: Path | None = None,
    limit: int | None = None,
) -> Dataset:
    """Dispatch on ``name`` (one of :data:`DATASETS`). ``limit`` keeps the first N items (baskets are
    restricted to them)."""
    if name in ("instacart", "homedepot", "icecat"):
        if data_dir is None:
            raise DatasetError(f"dataset {name!r} needs a data directory")
        if not Path(data_dir).is_dir():
            raise DatasetError(f"{data_dir}: data directory not found")
        return {"instacart": load_instacart, "homedepot": load_homedepot, "icecat": load_icecat}[name](
            Path(data_dir), limit=limit
        )
    if name in ("csv", "jsonl"):
        if catalog is None and data_dir is not None:
            catalog = Path(data_dir) / f"catalog.{name}"
            if orders is None and (Path(data_dir) / "orders.csv").is_file():
                orders = Path(data_dir) / "orders.csv"
        if catalog is None:
            raise DatasetError(f"dataset {name!r} needs --catalog FILE (or --data-dir with catalog.{name})")
        return load_generic(catalog, orders, fmt=name, limit=limit)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
