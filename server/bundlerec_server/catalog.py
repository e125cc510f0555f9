"""The catalog in index order (row i = HNSW label i), with category codes for vectorised filtering."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .artifact import ItemTable


@dataclass
class Catalog:
    ids: list[str]
    titles: list[str]
    categories: list[str]
    category_lower: list[str]  # stripped, lower-cased: what request filters name
    category_codes: np.ndarray  # int32 code per row; code of "" for none
    codes_by_name: dict[str, int]
    prices: np.ndarray  # float64, NaN where unknown
    quality: np.ndarray  # float32 prior, multiplies relevance
    row_of: dict[str, int]

    @classmethod
    def from_table(cls, table: ItemTable) -> Catalog:
        lower = [c.strip().lower() for c in table.categories]
        codes_by_name: dict[str, int] = {}
        codes = np.fromiter((codes_by_name.setdefault(c, len(codes_by_name)) for c in lower), dtype=np.int32, count=len(lower))
        return cls(
            table.ids, table.titles, table.categories, lower, codes, codes_by_name, table.prices, table.quality,
            {item_id: i for i, item_id in enumerate(table.ids)},
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_categories(self) -> int:
        return len(self.codes_by_name)

    def codes_of(self, names: Iterable[str]) -> np.ndarray:
        """Codes of the (lower-cased) category names this catalog has; unknown names are skipped."""
        return np.array([self.codes_by_name[c] for c in names if c in self.codes_by_name], dtype=np.int32)

    def rows_of(self, ids: Iterable[str]) -> np.ndarray:
        """Rows of the item ids this catalog has, ascending; unknown ids are skipped."""
        return np.array(sorted({self.row_of[i] for i in ids if i in self.row_of}), dtype=np.int64)
