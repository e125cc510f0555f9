"""Request filters are resolved once per request (RowFilter) and the same rules decide retrieval and bundling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bundlerec_server.artifact import ItemTable
from bundlerec_server.bundling import make_bundle
from bundlerec_server.catalog import Catalog
from bundlerec_server.domain import Filters, Hit, Mode, RecommendQuery, SearchQuery
from bundlerec_server.filters import RowFilter


@pytest.fixture(scope="module")
def engine(server):
    return server.app.runtime.engine()


def some_filters(engine) -> Filters:
    """Three included categories, one of them also excluded, two excluded items, a price cap at the median."""
    cat = engine.catalog
    names = sorted(cat.codes_by_name, key=lambda c: -cat.category_lower.count(c))[:4]
    in_a = [r for r in range(len(cat)) if cat.category_lower[r] == names[0]]
    prices = cat.prices[~np.isnan(cat.prices)]
    cap = float(np.median(prices)) if len(prices) else 10.0  # the Instacart slice has no prices: see the test below
    return Filters(include_categories=frozenset(names[:3]), exclude_categories=frozenset({names[2], "no such aisle"}),
                   max_price=cap, exclude_ids=frozenset({cat.ids[in_a[0]], cat.ids[in_a[1]], "nope"}))


def rule_item(cat, f: Filters, r: int) -> bool:
    return cat.ids[r] not in f.exclude_ids and cat.category_lower[r] not in f.exclude_categories


def rule_anchor(cat, f: Filters, r: int) -> bool:
    price = cat.prices[r]
    return (rule_item(cat, f, r) and (not f.include_categories or cat.category_lower[r] in f.include_categories)
            and (f.max_price is None or math.isnan(price) or price <= f.max_price))


def test_row_filter_follows_the_rules_row_by_row(engine):
    cat, f = engine.catalog, some_filters(engine)
    allowed = RowFilter.resolve(f, cat)
    rows = np.arange(len(cat))
    assert allowed.anchors(rows).tolist() == [rule_anchor(cat, f, r) for r in rows]
    assert allowed.items(rows).tolist() == [rule_item(cat, f, r) for r in rows]
    assert 0 < allowed.anchors(rows).sum() < allowed.items(rows).sum() < len(cat)  # each rule bites
    assert sorted(allowed.category_rows().tolist()) == [r for r in rows if cat.category_lower[r] in f.include_categories]
    nothing = RowFilter.resolve(Filters(include_categories=frozenset({"no such aisle"})), cat)
    assert not nothing.anchors(rows).any() and len(nothing.category_rows()) == 0


def test_price_cap_and_unknown_prices():
    table = ItemTable(["a", "b", "c", "d"], ["A", "B", "C", "D"], ["X", "x ", "Y", ""],
                      np.array([1.0, 5.0, np.nan, 3.0]), np.ones(4, dtype=np.float32), np.zeros(4, dtype=np.int32))
    cat = Catalog.from_table(table)
    rows = np.arange(4)
    f = Filters(max_price=3.0)
    assert RowFilter.resolve(f, cat).anchors(rows).tolist() == [rule_anchor(cat, f, r) for r in rows] == [True, False, True, True]
    assert RowFilter.resolve(f, cat).items(rows).all()  # a complement's price is checked against what is left of the cap
    f = Filters(include_categories=frozenset({"x"}), exclude_ids=frozenset({"a"}))
    assert RowFilter.resolve(f, cat).anchors(rows).tolist() == [False, True, False, False]  # "X" and "x " are one aisle


def test_bundling_admits_exactly_the_anchors_retrieval_admits(engine):
    cat, f = engine.catalog, some_filters(engine)
    allowed = RowFilter.resolve(f, cat)
    bundled = [make_bundle(Hit(r, 1.0), cat, engine.complements, allowed, 4, 0.25) is not None for r in range(len(cat))]
    assert bundled == allowed.anchors(np.arange(len(cat))).tolist()


@pytest.mark.parametrize("mode", [Mode.DENSE, Mode.LEXICAL, Mode.HYBRID])
def test_one_resolution_per_request_used_by_retrieval_and_bundling(engine, monkeypatch, mode):
    cat, f = engine.catalog, some_filters(engine)
    resolved = []
    real = RowFilter.resolve.__func__

    def counting(cls, filters, catalog):
        resolved.append(filters)
        return real(cls, filters, catalog)

    monkeypatch.setattr(RowFilter, "resolve", classmethod(counting))
    query = "organic milk"
    vec = engine.encoder.encode([query])[0]
    bundles = engine.recommend(RecommendQuery(query, max_bundles=10, items_per_bundle=4, filters=f, mode=mode), vec)
    assert resolved == [f]  # once for the whole request: retrieval of every channel and bundling
    for b in bundles:
        anchor, *rest = b.items
        assert anchor.is_anchor and rule_anchor(cat, f, anchor.row)
        assert all(rule_item(cat, f, it.row) for it in rest)
        assert b.total_price is None or b.total_price <= f.max_price + 1e-9
    resolved.clear()
    hits = engine.search(SearchQuery(query, k=20, filters=f, mode=mode), vec)
    assert resolved == [f]
    assert all(rule_anchor(cat, f, h.row) for h in hits)
