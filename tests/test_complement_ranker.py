"""User-level split, pair features (hand-computed), EASE vs a direct computation, the LambdaRank re-ranker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bundlerec_export import complement_features as cf
from bundlerec_export import complement_ranker as cr
from bundlerec_export.splits import latest_per_user, user_level_split

# ------------------------------------------------------------------------------------------------ split


def test_latest_per_user_and_split_never_leak_test_into_mining():
    users = ["u1", "u1", "u1", "u2", "u2", "u3", "", "u1"]
    numbers = [1, 3, 2, 1, 2, 7, 1, 4]
    assert latest_per_user(users, numbers).tolist() == [False, False, False, False, True, True, True, True]
    s = user_level_split(users, numbers)
    assert s.test.tolist() == [4, 5, 6, 7]  # u1's order 4, u2's 2, u3's only order, the id-less order
    assert s.train.tolist() == [0, 1, 2, 3]
    assert s.val.tolist() == [1, 3]  # u1's latest train order (number 3), u2's only train order
    assert s.fit.tolist() == [0, 2]
    # no test order is mined, val is inside train, fit = train - val
    assert not set(s.test.tolist()) & set(s.train.tolist())
    assert set(s.val.tolist()) <= set(s.train.tolist()) and set(s.fit.tolist()) == set(s.train.tolist()) - set(s.val.tolist())
    # every user's test order is later than every order of theirs that is mined
    for t in s.test.tolist():
        assert all(numbers[i] < numbers[t] for i in s.train.tolist() if users[i] == users[t] and users[t])
    with pytest.raises(ValueError):
        latest_per_user(["a"], [1, 2])


def test_split_on_shuffled_orders_is_the_same_set():
    rng = np.random.default_rng(3)
    users = [f"u{rng.integers(0, 20)}" for _ in range(200)]
    numbers = list(range(200))
    perm = rng.permutation(200)
    a = user_level_split(users, numbers)
    b = user_level_split([users[i] for i in perm], [numbers[i] for i in perm])
    assert sorted(perm[b.test].tolist()) == a.test.tolist()
    assert sorted(perm[b.val].tolist()) == a.val.tolist()


# --------------------------------------------------------------------------------------------- features

# 6 baskets over items 0..4; aisles: 0 dairy, 1 cereal, 2 dairy, 3 bakery, 4 cereal
BASKETS = [[0, 1], [0, 1, 3], [0, 2], [1, 3], [0, 1, 4, 4], [4]]
USERS = ["a", "a", "b", "c", "b", "c"]
AISLES = ["dairy", "cereal", "dairy", "bakery", "cereal"]
DEPTS = ["d", "b", "d", "b", "b"]
TITLES = ["Whole Milk", "Corn Flakes", "Milk Yogurt", "Rye Bread", "Bran Flakes"]


def _feat(x, name):
    return x[:, cf.FEATURES.index(name)]


def test_pair_stats_and_features_hand_computed():
    st = cf.pair_stats(BASKETS, 5, USERS, AISLES, DEPTS)
    # counts: 0 in 4 baskets, 1 in 4, 2 in 1, 3 in 2, 4 in 2; C[0,1] = 3, C[1,3] = 2, C[0,3] = 1
    assert st.counts.tolist() == [4, 4, 1, 2, 2]
    assert st.C[0, 1] == 3 and st.C[1, 3] == 2 and st.C[0, 3] == 1 and st.C[0, 0] == 0
    # shoppers who bought 0+1 in one basket: a (twice) and b -> 2; distinct shoppers of item 1: a, b, c
    assert st.S[0, 1] == 2 and st.S[1, 3] == 2 and st.S[0, 2] == 1
    assert st.user_counts.tolist() == [2, 3, 1, 2, 2]
    # weighted: baskets [0,1] (1/log2 3), [0,1,3] (1/log2 4), [0,1,4] (1/log2 4)
    assert st.Cw[0, 1] == pytest.approx(1 / math.log2(3) + 2 / math.log2(4))
    x = cf.pair_features(st, np.array([0, 0]), np.array([1, 3]), tokens=cf.title_tokens(TITLES))
    n = 6
    assert _feat(x, "c_ab").tolist() == [3, 1]
    np.testing.assert_allclose(_feat(x, "p_b_given_a"), [3 / 4, 1 / 4], rtol=1e-6)
    np.testing.assert_allclose(_feat(x, "p_a_given_b"), [3 / 4, 1 / 2], rtol=1e-6)
    np.testing.assert_allclose(_feat(x, "lift"), [3 * n / 16, 1 * n / 8], rtol=1e-6)
    npmi01 = math.log(3 * n / 16) / -math.log(3 / n)
    np.testing.assert_allclose(_feat(x, "npmi")[0], npmi01, rtol=1e-5)
    np.testing.assert_allclose(_feat(x, "jaccard"), [3 / 5, 1 / 5], rtol=1e-6)
    assert _feat(x, "shoppers_ab").tolist() == [2, 1] and _feat(x, "two_shoppers").tolist() == [1, 0]
    assert _feat(x, "same_aisle").tolist() == [0, 0]
    # b repeat rate = baskets / distinct shoppers: item 1 4/3, item 3 2/2
    np.testing.assert_allclose(_feat(x, "b_repeat"), [4 / 3, 1.0], rtol=1e-6)
    assert _feat(x, "title_jaccard").tolist() == [0.0, 0.0]
    y = cf.pair_features(st, np.array([1]), np.array([4]), tokens=cf.title_tokens(TITLES))
    assert _feat(y, "title_jaccard")[0] == pytest.approx(1 / 3)  # {corn, flakes} vs {bran, flakes}
    assert _feat(y, "same_aisle")[0] == 1.0
    # aisle pair: co-occurrence mass from dairy (items 0, 2): to cereal C[0,1]+C[0,4] = 3+1, to bakery C[0,3] = 1,
    # to dairy C[0,2]+C[2,0] = 2 -> 4/7, 1/7, 2/7
    aisle = st.aisle
    assert st.aisle_pair[aisle[0], aisle[1]] == pytest.approx(4 / 7)
    assert st.aisle_pair[aisle[0], aisle[3]] == pytest.approx(1 / 7)
    assert st.aisle_pair[aisle[0], aisle[0]] == pytest.approx(2 / 7)
    # never seen together: NPMI -1, counts 0
    z = cf.pair_features(st, np.array([2]), np.array([3]))
    assert _feat(z, "c_ab")[0] == 0 and _feat(z, "npmi")[0] == -1.0 and math.isnan(_feat(z, "ease")[0])


def test_conditional_scores_backoff_and_popularity_exponent():
    st = cf.pair_stats(BASKETS, 5, USERS, AISLES, DEPTS)
    s = cf.conditional_scores(st, alpha=2.0, beta=0.5, weighted=False, fill=5, cross_aisle=True)
    bo = st.backoff(np.array([0]), np.array([1]))[0]
    assert s[0, 1] == pytest.approx((3 + 2 * bo) / (4 + 2) / math.sqrt(4))
    # item 2 shares item 0's aisle: never a fill candidate (but it co-occurs, so it is in the support)
    assert s[0, 2] == pytest.approx((1 + 2 * st.backoff(np.array([0]), np.array([2]))[0]) / 6 / 1.0)
    indptr, idx, _ = cf.top_lists(s, 10, st.aisle_code, st.counts)
    assert 2 not in idx[indptr[0]:indptr[1]].tolist()
    # backoff fill gives item 2 (seen with 0 only) candidates it never co-occurred with
    assert set(idx[indptr[2]:indptr[3]].tolist()) >= {1, 3}


def test_cooccurrence_min_users():
    st = cf.pair_stats(BASKETS, 5, USERS, AISLES, DEPTS)
    two = cf.cooccurrence_scores(st, min_users=2)
    assert two[0, 1] == 3 and two[0, 3] == 0 and two[1, 3] == 2


def test_ease_matches_direct_computation():
    rng = np.random.default_rng(0)
    baskets = [sorted(set(rng.integers(0, 6, size=rng.integers(1, 5)).tolist())) for _ in range(40)]
    lam = 3.0
    model = cf.ease_model(baskets, 6, lam, max_items=6, min_count=1)
    x = np.zeros((40, 6))
    for k, b in enumerate(baskets):
        x[k, b] = 1
    g = x.T @ x + lam * np.eye(6)
    # direct: minimise ||X - XB||^2 + lam ||B||^2 with diag(B) = 0, column by column (least squares on the others)
    direct = np.zeros((6, 6))
    for j in range(6):
        others = [i for i in range(6) if i != j]
        gj = g[np.ix_(others, others)]
        direct[others, j] = np.linalg.solve(gj, (x.T @ x)[others, j])
    np.testing.assert_allclose(model.B, direct, atol=1e-5)
    assert model.scores(np.array([0, 1]), np.array([1, 0])) == pytest.approx([direct[0, 1], direct[1, 0]], abs=1e-5)
    # restricted to the 3 most frequent items: others get NaN
    small = cf.ease_model(baskets, 6, lam, max_items=3, min_count=1)
    assert len(small.items) == 3 and np.isnan(small.scores(np.array([0]), np.array([small.pos.tolist().index(-1)]))[0])


# ------------------------------------------------------------------------------------------------ ranker


def _synthetic(seed: int = 0, users: int = 60, orders: int = 6):
    """Items 0..29 in 6 aisles (i % 6); item i < 15 goes with i + 15 (another aisle) in most baskets."""
    rng = np.random.default_rng(seed)
    baskets, ids, nums = [], [], []
    for u in range(users):
        for k in range(orders):
            anchors = rng.choice(15, size=2, replace=False)
            b = set()
            for a in anchors.tolist():
                b.add(a)
                if rng.random() < 0.8:
                    b.add(a + 15)
            b.update(rng.integers(0, 30, size=2).tolist())
            baskets.append(sorted(b))
            ids.append(f"u{u}")
            nums.append(k + 1)
    aisles = [f"aisle{i % 6}" for i in range(30)]
    return baskets, ids, nums, aisles


def test_ranker_trains_and_ranks_deterministically():
    baskets, users, nums, aisles = _synthetic()
    cfg = cr.RankerConfig(top_k=5, n_candidates=10, fill=5, max_rounds=30, early_stopping=10, min_data_in_leaf=5,
                          num_leaves=7, ease_items=30, threads=1)
    titles = [f"item {i}" for i in range(30)]
    comp, rep = cr.rank_complements(baskets, 30, users=users, order_numbers=nums, titles=titles, aisles=aisles,
                                    departments=None, cfg=cfg)
    # the planted complement comes first for every anchor that has one
    firsts = [int(comp.of(a)[0][0]) for a in range(15)]
    assert sum(f == a + 15 for a, f in enumerate(firsts)) >= 13
    for a in range(30):
        idx, strength, support = comp.of(a)
        assert len(idx) == 5 and len(set(idx.tolist())) == 5
        assert all(aisles[j] != aisles[a] for j in idx.tolist())  # other aisles only
        assert np.all(np.diff(strength) <= 0) and np.all((strength > 0) & (strength <= 1))
    assert rep["label_baskets"] == 60 and rep["fit_baskets"] == 300
    assert rep["features"] == list(cf.FEATURES) and "model_text" in rep
    again, _ = cr.rank_complements(baskets, 30, users=users, order_numbers=nums, titles=titles, aisles=aisles, cfg=cfg)
    assert np.array_equal(comp.indices, again.indices) and np.array_equal(comp.strength, again.strength)


def test_ranker_features_come_from_fit_baskets_only(monkeypatch):
    """The label baskets are not in the statistics the training features are computed from."""
    baskets, users, nums, aisles = _synthetic(users=20, orders=3)
    seen = []
    real = cr.CandidateModel.__init__

    def spy(self, b, *a, **k):
        seen.append([tuple(x) for x in b])
        real(self, b, *a, **k)

    monkeypatch.setattr(cr.CandidateModel, "__init__", spy)
    cfg = cr.RankerConfig(top_k=3, n_candidates=5, fill=3, max_rounds=5, min_data_in_leaf=2, ease_items=30, threads=1)
    cr.rank_complements(baskets, 30, users=users, order_numbers=nums, aisles=aisles, cfg=cfg)
    labels = {tuple(b) for b, n in zip(baskets, nums) if n == 3}
    fit_seen, full_seen = seen
    assert len(fit_seen) == 40 and len(full_seen) == 60
    assert sorted(fit_seen) == sorted(tuple(b) for b, n in zip(baskets, nums) if n < 3)
    assert not (set(fit_seen) - {tuple(b) for b, n in zip(baskets, nums) if n < 3}) and labels


def test_leave_shopper_out_equals_mining_without_them():
    """Features with one shopper's baskets subtracted = features mined from the other shoppers' baskets
    (every count-based feature; the aisle aggregates and EASE are documented to keep them)."""
    baskets, users, _, aisles = _synthetic(seed=5, users=8, orders=3)
    st = cf.pair_stats(baskets, 30, users, aisles, None)
    others = [k for k, u in enumerate(users) if u != "u3"]
    st_wo = cf.pair_stats([baskets[k] for k in others], 30, [users[k] for k in others], aisles, None)
    rows = np.repeat(np.arange(30), 30)
    cols = np.tile(np.arange(30), 30)
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    own = np.asarray([k for k, u in enumerate(users) if u == "u3"])
    params = (2.0, 0.5, True)
    minus = cf.shopper_share(st, own, rows, cols)
    a = cf.pair_features(st, rows, cols, cond_params=params, minus=minus)
    b = cf.pair_features(st_wo, rows, cols, cond_params=params)
    exact = [f for f in cf.FEATURES if f not in ("aisle_pair", "dept_pair", "backoff", "cond_score", "a_degree",
                                                   "ease", "title_jaccard")]
    for f in exact:
        np.testing.assert_allclose(a[:, cf.FEATURES.index(f)], b[:, cf.FEATURES.index(f)], rtol=1e-5, atol=1e-6,
                                   err_msg=f)
    # and it changes something: the shopper's own pairs count less
    assert (a[:, cf.FEATURES.index("c_ab")] < cf.pair_features(st, rows, cols)[:, cf.FEATURES.index("c_ab")]).any()


def test_never_ordered_items_share_one_scored_list_per_aisle():
    """Build-time lever: never-ordered anchors of an aisle are scored once (their pair features are all equal
    but title overlap); without titles the result is exactly the per-anchor scoring's."""
    baskets, users, nums, aisles = _synthetic()
    n = 42  # items 30..41 never ordered, in aisles 30 % 6 .. 41 % 6 (two each), one with an unknown aisle
    aisles = aisles + [f"aisle{i % 6}" for i in range(30, 41)] + [""]
    base = dict(top_k=5, n_candidates=10, fill=5, max_rounds=30, early_stopping=10, min_data_in_leaf=5,
                num_leaves=7, ease_items=30, threads=1)
    shared, rep = cr.rank_complements(baskets, n, users=users, order_numbers=nums, aisles=aisles,
                                      cfg=cr.RankerConfig(**base))
    each, rep_each = cr.rank_complements(baskets, n, users=users, order_numbers=nums, aisles=aisles,
                                         cfg=cr.RankerConfig(**base, share_unordered=False))
    assert rep["anchors_scored"] == 30 + 7 and rep_each["anchors_scored"] == n  # 6 aisles + the unknown one
    for attr in ("indptr", "indices", "strength", "support"):
        assert np.array_equal(getattr(shared, attr), getattr(each, attr))
    for a in range(30, n - 1):  # the one with an unknown aisle has no aisle backoff: empty in both
        idx, _, support = shared.of(a)
        assert len(idx) == 5 and not support.any() and all(aisles[j] != aisles[a] for j in idx.tolist())
    # with titles, the two never-ordered items of an aisle get the same list
    titles = [f"item {i}" for i in range(n)]
    with_titles, _ = cr.rank_complements(baskets, n, users=users, order_numbers=nums, aisles=aisles, titles=titles,
                                         cfg=cr.RankerConfig(**base))
    assert np.array_equal(with_titles.of(30)[0], with_titles.of(36)[0])
