"""Complement mining: shrunk NPMI on hand-made baskets, support threshold, cross-category rule, fallback band."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bundlerec_export.complements import (
    item_counts,
    mine_cooccurrence,
    npmi_scores,
    pair_counts,
    popularity_quality,
    related_from_index,
)

# N = 10 baskets. c0 = 9, c1 = 4, c2 = 3, c3 = 2, c4 = 1; c01 = 4, c02 = 3, c03 = 2.
BASKETS = [[0, 1]] * 4 + [[0, 2, 2]] * 3 + [[0, 3]] * 2 + [[4]]
CATS = ["dairy", "cereal", "dairy", "bakery", ""]


def shrunk_npmi(c_ab, c_a, c_b, n, k=5.0):
    p_ab, p_a, p_b = c_ab / n, c_a / n, c_b / n
    return math.log(p_ab / (p_a * p_b)) / -math.log(p_ab) * c_ab / (c_ab + k)


def test_counts():
    assert item_counts(BASKETS, 5).tolist() == [9, 4, 3, 2, 1]  # duplicate 2 inside a basket counts once
    a, b, c = pair_counts(BASKETS, 5)
    assert sorted(zip(a.tolist(), b.tolist(), c.tolist(), strict=True)) == [(0, 1, 4), (0, 2, 3), (0, 3, 2)]


def test_npmi_hand_computed():
    # pair (0, 1): log(0.4 / (0.9 * 0.4)) / -log(0.4) = 0.114987..., shrunk by 4/9
    got = npmi_scores(np.array([4]), np.array([9.0]), np.array([4.0]), 10, 5.0)[0]
    assert got == pytest.approx(math.log(1 / 0.9) / -math.log(0.4) * 4 / 9, rel=1e-9)
    assert got == pytest.approx(0.051105, abs=1e-6)
    # negative association: c_ab = 1 with c_a = c_b = 5 of 10 -> log(0.4)/-log(0.1) * 1/6 < 0
    neg = npmi_scores(np.array([1]), np.array([5.0]), np.array([5.0]), 10, 5.0)[0]
    assert neg == pytest.approx(math.log(0.4) / math.log(10) / 6, rel=1e-9) and neg < 0
    # always together in every basket: NPMI defined as 1
    assert npmi_scores(np.array([10]), np.array([10.0]), np.array([10.0]), 10, 0.0)[0] == pytest.approx(1.0)


def test_min_support_and_cross_category():
    comp, stats = mine_cooccurrence(BASKETS, 5, CATS, min_support=3, top_k=20, shrinkage=5.0)
    # (0,2) is same-category (dairy), (0,3) has support 2 < 3: only 0 <-> 1 survives
    idx, strength, support = comp.of(0)
    assert idx.tolist() == [1] and support.tolist() == [4] and strength.tolist() == [1.0]
    assert comp.of(1)[0].tolist() == [0]
    assert comp.of(2)[0].tolist() == [] and comp.of(3)[0].tolist() == []
    assert stats.pairs == 2 and stats.anchors == 2 and stats.baskets == 10
    assert comp.indptr.tolist() == [0, 1, 2, 2, 2, 2]


def test_ranking_and_normalisation_without_categories():
    comp, _ = mine_cooccurrence(BASKETS, 5, None, min_support=2, top_k=20, shrinkage=5.0)
    idx, strength, support = comp.of(0)
    s01, s02, s03 = shrunk_npmi(4, 9, 4, 10), shrunk_npmi(3, 9, 3, 10), shrunk_npmi(2, 9, 2, 10)
    assert idx.tolist() == [1, 2, 3]
    assert support.tolist() == [4, 3, 2]
    np.testing.assert_allclose(strength, [1.0, s02 / s01, s03 / s01], rtol=1e-6)
    assert comp.strength.dtype == np.float32 and comp.indices.dtype == np.int32 and comp.indptr.dtype == np.int64
    # top_k keeps the best only
    top1, _ = mine_cooccurrence(BASKETS, 5, None, min_support=2, top_k=1, shrinkage=5.0)
    assert top1.of(0)[0].tolist() == [1]


def test_unknown_category_is_allowed():
    cats = ["dairy", "dairy", "", "x", "y"]
    comp, _ = mine_cooccurrence(BASKETS, 5, cats, min_support=3, shrinkage=5.0)
    assert comp.of(0)[0].tolist() == [2]  # 1 is same category; 2 has none


def test_negative_association_dropped():
    baskets = [[5, 6]] * 3 + [[5]] * 10 + [[6]] * 10 + [[0]] * 3
    comp, stats = mine_cooccurrence(baskets, 7, None, min_support=3, shrinkage=5.0)
    assert stats.pairs == 0 and len(comp.indices) == 0


def test_popularity_quality():
    q = popularity_quality(np.array([0, 1, 9]))
    np.testing.assert_allclose(q, [0.6, 0.6 + 0.4 * math.log(2) / math.log(10), 1.0], rtol=1e-6)
    assert popularity_quality(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def _unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_fallback_band_and_category():
    import hnswlib

    # cosine to item 0: 1 -> 0.95 (near-duplicate), 2 -> 0.70, 3 -> 0.50, 4 -> 0.20 (unrelated)
    angles = [0.0, math.degrees(math.acos(0.95)), -math.degrees(math.acos(0.70)),
              math.degrees(math.acos(0.50)), -math.degrees(math.acos(0.20))]
    emb = np.asarray([_unit(a) for a in angles], dtype=np.float32)
    index = hnswlib.Index(space="cosine", dim=2)
    index.init_index(max_elements=5, M=16, ef_construction=200, random_seed=1)
    index.add_items(emb, np.arange(5))
    comp, stats = related_from_index(index, emb, None, top_k=20, band=(0.45, 0.85))
    idx, strength, support = comp.of(0)
    assert idx.tolist() == [2, 3]
    np.testing.assert_allclose(strength, [(0.70 - 0.45) / 0.40, (0.50 - 0.45) / 0.40], atol=1e-4)
    assert support.tolist() == [0, 0]
    assert stats.method == "content_band"
    # same category as the anchor is excluded
    comp, _ = related_from_index(index, emb, ["a", "b", "c", "a", "d"], top_k=20, band=(0.45, 0.85))
    assert comp.of(0)[0].tolist() == [2]
    with pytest.raises(ValueError):
        related_from_index(index, emb, None, band=(0.9, 0.5))


def test_user_level_evidence():
    # user "loyal" buys 0+1 together in 5 orders; 0+2 are bought together by 3 different users.
    baskets = [[0, 1]] * 5 + [[0, 2]] * 3 + [[3]] * 3
    users = ["loyal"] * 5 + ["a", "b", "c"] + ["f", "g", ""]
    # baskets: N=11, c0=8, c1=5, c01=5 -> lift 11/8, npmi 0.404, x 5/10; c02=3 -> npmi 0.245, x 3/8
    by_basket, _ = mine_cooccurrence(baskets, 4, None, min_support=3, shrinkage=5.0)
    idx, strength, _ = by_basket.of(0)
    assert idx.tolist() == [1, 2]  # 5 baskets of one person count as 5
    np.testing.assert_allclose(strength, [1.0, shrunk_npmi(3, 8, 3, 11) / shrunk_npmi(5, 8, 5, 11)], rtol=1e-6)
    # users: N=7 (loyal, a, b, c, f, g, the id-less basket), c0=4, c1=1, c01=1 < 3: dropped; c02=3 kept
    by_user, stats = mine_cooccurrence(baskets, 4, None, users=users, min_support=3, shrinkage=5.0)
    idx, strength, support = by_user.of(0)
    assert idx.tolist() == [2] and support.tolist() == [3] and strength.tolist() == [1.0]
    assert (stats.unit, stats.units) == ("users", 7)
    assert shrunk_npmi(3, 4, 3, 7) > 0 and by_user.of(2)[0].tolist() == [0]
    # the support column still reports baskets, also when the unit is users
    repeat = [[0, 2]] * 4 + [[0, 2]] * 2 + [[1]]
    comp, _ = mine_cooccurrence(repeat, 3, None, users=["x"] * 4 + ["y", "z", "w"], min_support=3, shrinkage=5.0)
    assert comp.of(0)[2].tolist() == [6]


def test_basket_evidence_needs_distinct_shoppers():
    # "loyal" buys 0+1 together in 5 orders (one person); 0+2 are bought together by 3 different users
    baskets = [[0, 1]] * 5 + [[0, 2]] * 3 + [[3]] * 3
    users = ["loyal"] * 5 + ["a", "b", "c"] + ["f", "g", ""]
    comp, stats = mine_cooccurrence(baskets, 4, None, min_support=3, support_users=users, min_users=2)
    idx, _, support = comp.of(0)
    assert idx.tolist() == [2] and support.tolist() == [3]  # one shopper's habit is not a complement
    assert stats.unit == "baskets"
    loose, _ = mine_cooccurrence(baskets, 4, None, min_support=3, support_users=users, min_users=1)
    assert loose.of(0)[0].tolist() == [1, 2]
