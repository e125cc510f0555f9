"""Request filters resolved once against a catalog: the one place the filter rules are written.

Retrieval keeps a candidate when :meth:`RowFilter.anchors` allows it; bundling uses the same rule for an
anchor and :meth:`RowFilter.items` (excluded ids and categories only) for its complements, whose price is
checked against what is left of the cap as the bundle fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .catalog import Catalog
from .domain import Filters


@dataclass(frozen=True, eq=False)
class RowFilter:
    filters: Filters  # as requested
    category_codes: np.ndarray  # the catalog's code per row (shared, not copied)
    prices: np.ndarray  # the catalog's prices (NaN = unknown, never filtered out)
    included: np.ndarray | None  # bool per category code: named by include_categories (None: no such filter)
    not_excluded: np.ndarray  # bool per category code: not named by exclude_categories
    excluded: np.ndarray | None  # bool per row: an item of exclude_ids (None: no such item)

    @classmethod
    def resolve(cls, filters: Filters, catalog: Catalog) -> RowFilter:
        n = catalog.n_categories
        included = None
        if filters.include_categories:
            included = np.zeros(n, dtype=bool)
            included[catalog.codes_of(filters.include_categories)] = True
        not_excluded = np.ones(n, dtype=bool)
        if filters.exclude_categories:
            not_excluded[catalog.codes_of(filters.exclude_categories)] = False
        excluded = None
        rows = catalog.rows_of(filters.exclude_ids)
        if len(rows):
            excluded = np.zeros(len(catalog), dtype=bool)
            excluded[rows] = True
        return cls(filters, catalog.category_codes, catalog.prices, included, not_excluded, excluded)

    @property
    def max_price(self) -> float | None:
        return self.filters.max_price

    def category_rows(self) -> np.ndarray | None:
        """Every row of the included categories (None when the request names none)."""
        if self.included is None:
            return None
        rows: np.ndarray = np.flatnonzero(self.included[self.category_codes])
        return rows

    def items(self, rows: np.ndarray) -> np.ndarray:
        """Mask of ``rows`` allowed anywhere in a bundle: not an excluded id, not in an excluded category."""
        keep: np.ndarray = self.not_excluded[self.category_codes[rows]]
        if self.excluded is not None:
            keep &= ~self.excluded[rows]
        return keep

    def anchors(self, rows: np.ndarray) -> np.ndarray:
        """Mask of ``rows`` allowed as a hit or a bundle's anchor: :meth:`items`, in an included category (when
        the request names any) and priced within the cap (an unknown price passes)."""
        keep = self.items(rows)
        if self.included is not None:
            keep &= self.included[self.category_codes[rows]]
        if self.max_price is not None:
            prices = self.prices[rows]
            keep &= np.isnan(prices) | (prices <= self.max_price)
        return keep

    def allows_anchor(self, row: int) -> bool:
        return bool(self.anchors(np.array([row], dtype=np.int64))[0])
