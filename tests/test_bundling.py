"""Bundle assembly and ranking on a hand-made catalog (pure logic, no model)."""


import numpy as np
import pytest

from bundlerec_server.artifact import Complements, ItemTable
from bundlerec_server.bundling import PERSONAL_REASON, make_bundle, rank_bundles, reason_for, shopper_affinity
from bundlerec_server.catalog import Catalog
from bundlerec_server.domain import Filters, Hit
from bundlerec_server.filters import RowFilter


def catalog_of(rows) -> Catalog:
    n = len(rows)
    return Catalog.from_table(ItemTable(
        [r[0] for r in rows], [r[0] for r in rows], [r[1] for r in rows],
        np.array([np.nan if r[2] is None else r[2] for r in rows]), np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.int32)))


CATALOG = catalog_of([
    ("pasta", "Pasta", 2.0),        # 0
    ("sauce", "Sauces", 3.0),       # 1
    ("cheese", "Cheese", 5.0),      # 2
    ("pasta2", "Pasta", 2.5),       # 3  same category as 0: never its complement
    ("wine", "Wine", None),         # 4  unknown price
    ("bread", "Bakery", 1.0),       # 5
])


def comps(adj: dict[int, list[tuple[int, float, int]]], n: int = 6) -> Complements:
    indptr, idx, strength, support = [0], [], [], []
    for row in range(n):
        for r, s, c in adj.get(row, []):
            idx.append(r)
            strength.append(s)
            support.append(c)
        indptr.append(len(idx))
    return Complements(np.array(indptr), np.array(idx, dtype=np.int32), np.array(strength, dtype=np.float32), np.array(support, dtype=np.int32))


def allow(**filters) -> RowFilter:
    return RowFilter.resolve(Filters(**filters), CATALOG)


COMPS = comps({0: [(3, 0.9, 50), (1, 0.8, 40), (2, 0.5, 10), (4, 0.4, 5)], 5: [(2, 0.3, 7)]})


def test_complements_skip_anchor_category_and_keep_order():
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(), items_per_bundle=3, bonus=0.25)
    assert [i.row for i in b.items] == [0, 1, 2]
    assert b.items[0].is_anchor and not b.items[1].is_anchor
    assert b.total_price == pytest.approx(10.0)
    assert b.reason == "bought together in 40 baskets"
    # anchor 0.5 x (1 + 0.25 x (0.8 + 0.5) / 2)
    assert b.score == pytest.approx(0.5 * (1 + 0.25 * 1.3 / 2))


def test_price_cap_skips_complements_that_do_not_fit():
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(max_price=6.0), items_per_bundle=3, bonus=0.25)
    # 2 (pasta) + 3 (sauce) = 5; cheese would make 10 > 6; wine has no price so it is allowed
    assert [i.row for i in b.items] == [0, 1, 4]
    assert b.total_price is None  # wine's price is unknown


def test_anchor_over_price_cap_or_excluded_is_dropped():
    assert make_bundle(Hit(2, 0.9), CATALOG, COMPS, allow(max_price=4.0), 3, 0.25) is None
    assert make_bundle(Hit(0, 0.9), CATALOG, COMPS, allow(exclude_ids=frozenset({"pasta"})), 3, 0.25) is None
    assert make_bundle(Hit(0, 0.9), CATALOG, COMPS, allow(include_categories=frozenset({"cheese"})), 3, 0.25) is None


def test_excluded_category_and_ids_never_appear_as_complements():
    f = allow(exclude_categories=frozenset({"sauces"}), exclude_ids=frozenset({"cheese"}))
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, f, 3, 0.25)
    assert [i.row for i in b.items] == [0, 4]


def test_anchor_only_bundles_keep_anchor_score():
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(), items_per_bundle=1, bonus=0.25)
    assert [i.row for i in b.items] == [0]
    assert b.score == pytest.approx(0.5)
    assert b.reason == "top match for the query"


def test_rank_bundles_sorted_best_first_and_capped():
    anchors = [Hit(5, 0.6), Hit(0, 0.55), Hit(2, 0.1)]
    out = rank_bundles(anchors, CATALOG, COMPS, allow(), max_bundles=2, items_per_bundle=3, bonus=0.25)
    assert len(out) == 2
    assert out[0].score >= out[1].score
    # pasta's strong complements lift it above bread despite its lower anchor score
    assert [b.items[0].row for b in out] == [0, 5]


def test_reason_for_content_based_fallback():
    assert reason_for([(1, 0.5, 0)]) == "predicted complements: no order history for this pair yet"


def test_weak_complements_are_dropped():
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(), items_per_bundle=4, bonus=0.25, min_strength=0.6)
    assert [i.row for i in b.items] == [0, 1]  # 0.5 (cheese) and 0.4 (wine) fall below 0.6


def test_early_stop_gives_the_same_bundles_as_exhaustive_ranking():
    rng = np.random.default_rng(0)
    n = 6
    adj = {r: [(int(c), float(s), 3) for c, s in zip(rng.choice(n, 3, replace=False), np.sort(rng.random(3))[::-1], strict=True) if c != r]
           for r in range(n)}
    comp = comps(adj, n)
    anchors = sorted((Hit(r, float(s)) for r, s in enumerate(rng.random(n))), key=lambda h: -h.score)
    made = [b for b in (make_bundle(a, CATALOG, comp, allow(), 3, 0.25) for a in anchors) if b is not None]
    exhaustive = sorted([b for b in made if len(b.items) > 1] or made, key=lambda b: -b.score)
    for k in range(1, n + 1):
        got = rank_bundles(anchors, CATALOG, comp, allow(), k, 3, 0.25)
        assert [b.items for b in got] == [b.items for b in exhaustive[:k]]


def test_fusion_rrf_and_blend():
    from bundlerec_server.fusion import Fusion, fuse

    dense = [Hit(1, 0.9), Hit(2, 0.8), Hit(3, 0.5)]
    lexical = [Hit(3, 12.0), Hit(4, 6.0), Hit(1, 2.0)]
    rrf = fuse(dense, lexical, Fusion("rrf", rrf_k=60), 4)
    # item 1: 1/61 + 1/63; item 3: 1/63 + 1/61 (tie, first seen wins); 2: 1/62; 4: 1/62
    assert [h.row for h in rrf] == [1, 3, 2, 4]
    assert rrf[0].score == pytest.approx(1 / 61 + 1 / 63)
    blend = fuse(dense, lexical, Fusion("blend", alpha=0.25), 4)
    # min-max: dense 1->1, 2->0.75, 3->0; lexical 3->1, 4->0.4, 1->0
    # 1: .25*1 = .25; 2: .25*.75 = .1875; 3: .75*1 = .75; 4: .75*.4 = .3
    assert [h.row for h in blend] == [3, 4, 1, 2]
    assert blend[0].score == pytest.approx(0.75)
    assert [h.row for h in fuse(dense, lexical, Fusion("blend", alpha=1.0), 3)] == [1, 2, 3]


def test_fusion_on_exact_scores_with_coverage():
    from bundlerec_server.fusion import Candidates, Fusion, fuse_scores

    c = Candidates(
        rows=np.array([2, 5, 7, 9]),
        cosine=np.array([0.9, 0.5, 0.7, 0.5]),  # scaled: 1, 0, .5, 0
        bm25=np.array([0.0, 10.0, 5.0, 0.0]),  # scaled: 0, 1, .5, 0
        coverage=np.array([0.0, 1.0, 0.5, 0.5]),
        quality=np.array([1.0, 1.0, 1.0, 0.5]),
    )
    # alpha .5, coverage 0: 2 -> .5, 5 -> .5, 7 -> .5, 9 -> 0; ties by row
    assert [h.row for h in fuse_scores(c, Fusion("scores", alpha=0.5), 4)] == [2, 5, 7, 9]
    # coverage 1: 2 -> .5, 5 -> 1.5, 7 -> 1.0, 9 -> (0 + .5) x quality .5 = .25
    hits = fuse_scores(c, Fusion("scores", alpha=0.5, coverage=1.0), 3)
    assert [h.row for h in hits] == [5, 7, 2]
    assert [h.score for h in hits] == pytest.approx([1.5, 1.0, 0.5])
    # alpha 1: cosine alone
    assert [h.row for h in fuse_scores(c, Fusion("scores", alpha=1.0), 2)] == [2, 7]
    empty = Candidates(*(np.zeros(0) for _ in range(5)))
    assert fuse_scores(empty, Fusion("scores"), 3) == []
    from bundlerec_server.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="invalid fusion"):
        Fusion.from_dict({"method": "scores", "coverage": -1})


def test_min_strength_never_empties_a_bundle():
    # every complement of anchor 0 is below 0.95: the best one that passes the filters is kept, and only it
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(), items_per_bundle=4, bonus=0.25, min_strength=0.95)
    assert [i.row for i in b.items] == [0, 1]  # 3 (0.9) is in the anchor's category; 1 (0.8) is the best allowed
    f = allow(exclude_categories=frozenset({"sauces"}))
    assert [i.row for i in make_bundle(Hit(0, 0.5), CATALOG, COMPS, f, 4, 0.25, min_strength=0.95).items] == [0, 2]


def test_no_one_item_bundles_unless_asked_or_nothing_else():
    anchors = [Hit(1, 0.9), Hit(0, 0.5), Hit(5, 0.4)]  # sauce (1) has no complement at all
    out = rank_bundles(anchors, CATALOG, COMPS, allow(), max_bundles=3, items_per_bundle=3, bonus=0.25, min_strength=0.95)
    assert [b.items[0].row for b in out] == [0, 5] and all(len(b.items) >= 2 for b in out)
    assert [len(b.items) for b in out] == [2, 2]  # weak complements: the single best allowed one each
    one = rank_bundles(anchors, CATALOG, COMPS, allow(), max_bundles=3, items_per_bundle=1, bonus=0.25)
    assert [len(b.items) for b in one] == [1, 1, 1]
    # no anchor can get a complement: the one-item bundles are the answer rather than nothing
    alone = rank_bundles([Hit(1, 0.9), Hit(2, 0.3)], CATALOG, COMPS, allow(), max_bundles=3, items_per_bundle=3, bonus=0.25)
    assert [[i.row for i in b.items] for b in alone] == [[1], [2]]


def test_shopper_affinity_counts_repeats_and_decays_with_position():
    aff = shopper_affinity([5, 2, 5], [2], half_life=1.0)
    # 5: 1 + 0.25; 2: 0.5 + 1 (both sources); scaled by the largest
    assert aff == pytest.approx({2: 1.0, 5: 1.25 / 1.5})
    assert shopper_affinity([], []) == {}


def test_personal_complements_prefer_the_shoppers_items_and_say_so():
    # the shopper often buys bread (5), which is not on pasta's list; cheese (2) is on it and bought once, long ago
    personal = shopper_affinity([5, 5, 5, 2], half_life=2.0)
    b = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(), items_per_bundle=3, bonus=0.25, min_strength=0.6,
                    personal=personal)
    # mix: bread 0.75 x 1.0; sauce 0.25 x (1 - 1/4); cheese 0.75 x aff(2) + 0.25 x (1 - 2/4) ...
    assert [i.row for i in b.items][:2] == [0, 5]
    assert b.reason.startswith(PERSONAL_REASON)
    assert len(b.items) == 3 and 3 not in [i.row for i in b.items]  # same category as the anchor: never
    # filters still hold for the shopper's own items
    f = allow(exclude_categories=frozenset({"bakery"}))
    assert 5 not in [i.row for i in make_bundle(Hit(0, 0.5), CATALOG, COMPS, f, 3, 0.25, personal=personal).items]
    # without history: the stored list, as before
    plain = make_bundle(Hit(0, 0.5), CATALOG, COMPS, allow(), 3, 0.25, personal={})
    assert [i.row for i in plain.items] == [0, 1, 2] and plain.reason == "bought together in 40 baskets"
