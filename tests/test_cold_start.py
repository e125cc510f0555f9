"""Cold-start complements (bundlerec_export.cold_start): model, substitute rule, CSR output, persistence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bundlerec_export import cold_start as cs

DIM = 16


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _synthetic(seed: int = 0):
    """Three product types, each a tight cluster of title embeddings: chips (0-9), salsa (10-19), soap (20-29).
    Baskets: chips with salsa (complements, other category), chips with chips (substitutes bought together,
    same category), soap alone or with soap."""
    rng = np.random.default_rng(seed)
    axes = np.eye(DIM, dtype=np.float32)
    emb = np.concatenate([_unit(axes[k] + 0.15 * rng.normal(size=(10, DIM))) for k in range(3)])
    cats = ["chips"] * 10 + ["salsa"] * 10 + ["soap"] * 10
    titles = [f"tortilla chips {i}" for i in range(10)] + [f"salsa jar {i}" for i in range(10)] + \
             [f"hand soap {i}" for i in range(10)]
    baskets = []
    for _ in range(300):
        c, s, c2 = rng.integers(0, 10), rng.integers(10, 20), rng.integers(0, 10)
        baskets.append([int(c), int(s)])
        baskets.append([int(c), int(c2)])
        baskets.append([int(rng.integers(20, 30)), int(rng.integers(20, 30))])
    return emb, cats, titles, baskets, rng


def _train(seed: int = 0, **kw):
    emb, cats, titles, baskets, _ = _synthetic()
    cfg = cs.TrainConfig(dim=8, epochs=kw.pop("epochs", 60), batch=16, lr=0.05, seed=seed, **kw)
    return cs.train_cold_start(emb, baskets, cats, cfg)


def test_targets_keep_cross_category_pairs_with_enough_support():
    baskets = [[0, 1, 2], [0, 1], [0, 2], [1, 3]]
    t = cs.cooccurrence_targets(baskets, 4, ["a", "b", "a", "c"], min_support=2).toarray()
    # (0, 1) in 2 baskets, other category: kept both ways; (0, 2) twice but same category; (1, 3) once
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 2
    assert np.array_equal(t, expected)
    assert cs.cooccurrence_targets(baskets, 4, ["a", "b", "a", "c"], min_support=1)[1, 3] == 1


def test_asymmetric_model_ranks_planted_complement_above_substitute():
    emb, cats, titles, baskets, rng = _synthetic()
    model, meta = _train()
    assert meta["loss"][-1] < meta["loss"][0]
    # an unseen chips title (its own orders never seen) and an unseen chips substitute vs an unseen salsa
    new_chips, other_chips, new_salsa = (_unit(np.eye(DIM)[k] + 0.15 * rng.normal(size=DIM)) for k in (0, 0, 1))
    s = model.score(new_chips[None], np.stack([other_chips, new_salsa]))[0]
    assert s[1] > s[0], s
    # similarity would rank the substitute first: the model is not a similarity
    assert float(new_chips @ other_chips) > float(new_chips @ new_salsa)
    # asymmetric: soap is never a complement target, so the anchor side of soap carries no "chips" preference
    full = model.score(emb, emb)
    assert not np.allclose(full, full.T, atol=1e-3)


def test_lists_exclude_same_category_and_near_duplicates():
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(6, DIM)))
    emb = base.copy()
    emb[1] = _unit(base[0] + 0.05 * rng.normal(size=DIM))  # near-duplicate of 0 (cosine ~0.99), other category
    titles = ["living basil", "basil leaves fresh", "pasta", "olive oil", "tomato", "basil living herb"]
    cats = ["herbs", "spices", "pasta", "oils", "produce", "produce"]
    # a similarity model: W_a = W_c = I, so without the rule the best "complement" is the near-duplicate
    sim = cs.ColdStartModel(np.eye(DIM, dtype=np.float32), np.eye(DIM, dtype=np.float32), np.zeros(DIM, np.float32))
    raw = cs.cold_start_complements(emb, cats, titles, sim, top_k=5, exclude_substitutes=False)
    assert raw.of(0)[0][0] == 1
    comp = cs.cold_start_complements(emb, cats, titles, sim, top_k=5)
    assert 1 not in comp.of(0)[0].tolist()  # cosine >= 0.8
    assert 5 not in comp.of(0)[0].tolist()  # token Jaccard {basil, living} / {basil, living, herb} >= 0.5
    assert 5 not in comp.of(4)[0].tolist()  # same category (produce)
    assert 4 in raw.of(5)[0].tolist() and 4 not in comp.of(5)[0].tolist()


def test_unknown_categories_fall_back_to_title_clusters():
    emb, _, titles, _, _ = _synthetic()
    groups = cs.substitute_groups(emb, None, cluster_size=10, seed=0)
    assert len(set(groups[:10].tolist())) == 1 and len(set(groups[10:20].tolist())) == 1
    assert groups[0] != groups[10] != groups[20]
    sim = cs.ColdStartModel(np.eye(DIM, dtype=np.float32), np.eye(DIM, dtype=np.float32), np.zeros(DIM, np.float32))
    comp = cs.cold_start_complements(emb, None, titles, sim, top_k=5, cluster_size=10)
    assert all(c >= 10 for c in comp.of(0)[0].tolist())


def test_csr_output_is_valid():
    emb, cats, titles, _, _ = _synthetic()
    model, _ = _train(epochs=5)
    anchors = np.zeros(len(emb), dtype=bool)
    anchors[[0, 5, 12, 25]] = True
    comp = cs.cold_start_complements(emb, cats, titles, model, top_k=4, anchors=anchors)
    assert len(comp.indptr) == len(emb) + 1 and comp.indptr[0] == 0
    assert np.all(np.diff(comp.indptr) >= 0) and comp.indptr[-1] == len(comp.indices)
    assert comp.indices.dtype == np.int32 and comp.strength.dtype == np.float32 and comp.support.dtype == np.int32
    assert np.all(comp.strength > 0) and np.all(comp.strength <= 1) and np.all(comp.support == 0)
    for row in range(len(emb)):
        cols, strength, _ = comp.of(row)
        if not anchors[row]:
            assert len(cols) == 0
            continue
        assert 0 < len(cols) <= 4 and row not in cols.tolist() and len(set(cols.tolist())) == len(cols)
        assert strength[0] == 1.0 and np.all(np.diff(strength) <= 0)
        assert all(cats[c] != cats[row] for c in cols.tolist())


def test_save_load_round_trip(tmp_path):
    emb, cats, titles, _, _ = _synthetic()
    model, _ = _train(epochs=5)
    path = tmp_path / "cold.npz"
    model.save(path)
    loaded = cs.ColdStartModel.load(path)
    assert np.array_equal(loaded.score(emb, emb), model.score(emb, emb))
    assert loaded.meta["method"] == cs.COLD_START_METHOD and loaded.gamma == model.gamma
    a = cs.cold_start_complements(emb, cats, titles, model, top_k=5)
    b = cs.cold_start_complements(emb, cats, titles, loaded, top_k=5)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.indptr, b.indptr)


def test_training_is_deterministic_with_a_seed():
    m1, _ = _train(seed=3, epochs=5)
    m2, _ = _train(seed=3, epochs=5)
    m3, _ = _train(seed=4, epochs=5)
    assert np.array_equal(m1.w_anchor, m2.w_anchor) and np.array_equal(m1.w_bias, m2.w_bias)
    assert not np.array_equal(m1.w_anchor, m3.w_anchor)


def test_popularity_prior_is_used_only_when_trained_and_given():
    emb, cats, titles, baskets, _ = _synthetic()
    model, _ = _train(epochs=20, use_popularity=True)
    assert model.gamma != 0.0
    pop = np.zeros(len(emb))
    pop[15] = 1e6
    assert not np.array_equal(model.comp_prior(emb, pop), model.comp_prior(emb))
    content, _ = _train(epochs=5)
    assert content.gamma == 0.0 and np.array_equal(content.comp_prior(emb, pop), content.comp_prior(emb))


def test_rejects_mismatched_inputs():
    emb, cats, titles, _, _ = _synthetic()
    model, _ = _train(epochs=2)
    with pytest.raises(ValueError):
        cs.cold_start_complements(emb, cats, titles[:-1], model)
    with pytest.raises(ValueError):
        cs.cold_start_complements(emb[:, :8], cats, titles, model)


def test_group_prior_from_orders_favours_the_co_purchased_category():
    emb, cats, titles, baskets, _ = _synthetic()
    prior = cs.group_prior_from_orders(baskets, cats)
    chips, salsa, soap = (prior.codes[k] for k in (0, 10, 20))
    assert prior.log_p[chips, salsa] > prior.log_p[chips, soap]
    assert np.isclose(np.exp(prior.log_p[chips]).sum(), 1.0)
    # a content-blind model (all scores equal) follows the prior: chips -> salsa first
    zero = np.zeros((DIM, 1), np.float32)
    flat = cs.ColdStartModel(zero, zero, np.zeros(DIM, np.float32))
    comp = cs.cold_start_complements(emb, cats, titles, flat, top_k=10, group_prior=prior)
    assert all(10 <= c < 20 for c in comp.of(0)[0].tolist())
    unknown = cs.GroupPrior(np.full(len(emb), -1), prior.log_p)
    assert not unknown.of(np.arange(3)).any()


def test_fill_empty_rows_keeps_mined_lists_and_fills_the_rest():
    from bundlerec_server.artifact import Complements

    mined = Complements(np.array([0, 2, 2, 3]), np.array([1, 2, 0], np.int32), np.array([1, .5, 1], np.float32),
                        np.array([7, 3, 2], np.int32))
    cold = Complements(np.array([0, 1, 3, 4]), np.array([2, 0, 2, 1], np.int32), np.array([1, 1, .2, 1], np.float32),
                       np.zeros(4, np.int32))
    out, filled = cs.fill_empty_rows(mined, cold)
    assert filled.tolist() == [False, True, False]
    assert out.indptr.tolist() == [0, 2, 4, 5]
    assert out.indices.tolist() == [1, 2, 0, 2, 0] and out.support.tolist() == [7, 3, 0, 0, 2]
    with pytest.raises(ValueError):
        cs.fill_empty_rows(mined, Complements(np.array([0, 0]), np.zeros(0, np.int32), np.zeros(0, np.float32),
                                              np.zeros(0, np.int32)))


def test_fill_rows_replaces_the_given_rows_only():
    from bundlerec_server.artifact import Complements

    learned = Complements(np.array([0, 2, 3, 4]), np.array([1, 2, 0, 1], np.int32), np.ones(4, np.float32),
                          np.array([7, 3, 0, 0], np.int32))
    cold = Complements(np.array([0, 1, 3, 3]), np.array([2, 0, 2], np.int32), np.ones(3, np.float32),
                       np.zeros(3, np.int32))
    out, used = cs.fill_empty_rows(learned, cold, rows=np.array([False, True, True]))
    # row 1 takes the cold list; row 2 is asked for but the cold list is empty: the learned one stays
    assert used.tolist() == [False, True, False]
    assert out.indptr.tolist() == [0, 2, 4, 5] and out.indices.tolist() == [1, 2, 0, 2, 1]


def _context_baskets():
    # items: 0, 1 in aisle A; 2 in B; 3 in C; 4 unknown aisle
    cats = ["A", "A", "B", "C", ""]
    baskets = [[0, 2], [0, 1, 2], [1, 3], [2, 3], [0, 4], [3], [2, 2, 0]]
    return cats, baskets


def test_aisle_item_counts_by_hand():
    cats, baskets = _context_baskets()
    n_ac, n_a, n_c = cs.aisle_item_counts(baskets, cats, 5)
    # n(A, c): baskets with c and ANOTHER item of A. c = 0 (in A): only basket 1 has a second A item (1);
    # baskets 0, 4, 6 hold 0 as their only A item, so 0 is not its own evidence
    assert n_ac[0].tolist() == [1, 1, 3, 1, 1]  # 2 with A: baskets 0, 1, 6 (the duplicate line counts once)
    assert n_ac[1].tolist() == [3, 1, 0, 1, 0]  # B = {2}: 0 with 2 in baskets 0, 1, 6; 2 is not its own evidence
    assert n_ac[2].tolist() == [0, 1, 1, 0, 0]  # C = {3}: baskets 2, 3
    assert n_a.tolist() == [5, 4, 3] and n_c.tolist() == [4, 2, 4, 3, 1]


def test_aisle_context_lift_is_smoothed_conditional_over_popularity():
    cats, baskets = _context_baskets()
    alpha = 2.0
    ctx = cs.aisle_context_from_orders(baskets, cats, alpha=alpha)
    p = np.array([4, 2, 4, 3, 1]) / 7
    p_c_given_a = (np.array([1, 1, 3, 1, 1]) + alpha * p) / (5 + alpha)
    assert np.allclose(ctx.log_lift[0], np.log(p_c_given_a / p), atol=1e-6)
    # an anchor of unknown category gets no context; weight scales it
    assert not ctx.of(np.array([4])).any()
    assert np.allclose(ctx.with_weight(0.5).of(np.array([1]))[0], 0.5 * ctx.log_lift[0], atol=1e-6)
    # never-ordered candidates get 0, not a NaN
    ctx2 = cs.aisle_context_from_orders(baskets, cats + ["C"], alpha=alpha)
    assert ctx2.log_lift[:, 5].tolist() == [0.0, 0.0, 0.0] and np.isfinite(ctx2.log_lift).all()


def _popularity_setup():
    """12 items in 4 aisles with distinct order counts (ties would make "the" popularity order ambiguous)."""
    rng = np.random.default_rng(3)
    n = 12
    cats = [f"aisle{i % 4}" for i in range(n)]
    titles = [f"item{i} {w}" for i, w in enumerate("ab cd ef gh ij kl mn op qr st uv wx".split())]
    emb = _unit(rng.normal(size=(n, DIM)))
    counts = np.arange(n)[::-1] * 3 + 1  # item 0 the most popular
    baskets = [[i] for i in range(n) for _ in range(int(counts[i]))]
    # item 11 (the least popular) is bought with aisle0 items: the lift prefers it for aisle0 anchors
    baskets += [[0, 11], [4, 11], [8, 11]] * 4
    counts = np.zeros(n)
    for b in baskets:
        counts[np.unique(b)] += 1
    return emb, cats, titles, baskets, counts


def test_context_scorer_reduces_to_popularity_at_zero_weights():
    emb, cats, titles, baskets, counts = _popularity_setup()
    ctx = cs.aisle_context_from_orders(baskets, cats, alpha=1.0)
    zero = np.zeros((DIM, 1), np.float32)
    content_free = cs.ColdStartModel(zero, zero, np.zeros(DIM, np.float32), gamma=1.0)
    pop_order = [int(i) for i in np.argsort(-counts, kind="stable")]
    for beta in (0.0, 1.0):
        comp = cs.cold_start_complements(emb, cats, titles, content_free, top_k=5, popularity=counts,
                                         context=ctx.with_weight(beta), dup_cosine=1.01, dup_jaccard=1.01)
        expected = [c for c in pop_order if cats[c] != cats[0]][:5]
        got = comp.of(0)[0].tolist()
        if beta == 0.0:
            assert got == expected  # beta = 0: global popularity, other aisles
        else:
            assert got[0] == 11 and got != expected  # the aisle-conditioned term moves item 11 up
    # the mix: content + w_pop * log1p(orders) + w_ctx * lift; a zero content model at w_ctx = 0 is popularity
    mix = cs.cold_start_complements(emb, cats, titles, content_free, top_k=5, popularity=counts,
                                    context=ctx.with_weight(0.0), dup_cosine=1.01, dup_jaccard=1.01)
    assert mix.of(5)[0].tolist() == [c for c in pop_order if cats[c] != cats[5]][:5]


def test_hub_correction_demotes_a_candidate_that_tops_every_list():
    """Item 0 is a hub: it scores high for every anchor (a large complement vector and a content prior). Anchors
    1..4 each have a partner (5..8) that only they score high. Uncorrected, the hub tops every list; with the CSLS
    correction each anchor's partner does."""
    n, d = 9, 9
    emb = np.eye(n, d, dtype=np.float32)  # item i = direction i
    wa = np.zeros((d, 5), np.float32)
    wc = np.zeros((d, 5), np.float32)
    wc[0, 0] = 3.0  # the hub's complement vector
    for k in range(1, 5):
        wa[k, 0] = 1.0  # every anchor likes the hub: 3.0
        wa[k, k] = 1.0
        wc[k + 4, k] = 2.4  # anchor k alone likes its partner k + 4: 2.4
    bias = np.zeros(d, np.float32)
    bias[0] = 1.0  # and the grocery-style content prior favours the hub too
    model = cs.ColdStartModel(wa, wc, bias)
    titles = [f"item {chr(97 + i)}" for i in range(n)]
    groups = np.arange(n)  # no substitutes here
    anchors = np.arange(1, 5)

    def lists(hub: cs.HubCorrection | None) -> Any:
        return cs.cold_start_complements(emb, None, titles, model, top_k=3, anchors=anchors, groups=groups, hub=hub)

    plain = lists(None)
    assert [int(plain.of(a)[0][0]) for a in anchors] == [0, 0, 0, 0]
    hub = cs.HubCorrection(csls_k=3)
    fixed = lists(hub)
    assert [int(fixed.of(a)[0][0]) for a in anchors] == [5, 6, 7, 8]
    before, after = cs.hubness(plain, anchors, k=1, k_occ=1), cs.hubness(fixed, anchors, k=1, k_occ=1)
    assert (before["distinct"], before["max_occurrences"]) == (1, 4)
    assert (after["distinct"], after["max_occurrences"]) == (4, 1)
    # dropping the prior alone does not help here (3.0 > 2.4): the hub is in the bilinear term too
    assert [int(lists(cs.HubCorrection(prior_weight=0.0)).of(a)[0][0]) for a in anchors] == [0, 0, 0, 0]
    assert hub.active and not cs.HubCorrection().active
