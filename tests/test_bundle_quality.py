"""benchmarks/bundle_quality.py: recall, baselines, split, data prep (tiny hand-made data, no server)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bundle_quality as bq

ROOT = Path(__file__).resolve().parents[1]

# rows: 0 milk (A, D1), 1 cereal (B, D1), 2 yogurt (A, D1), 3 bread (C, D2), 4 jam (D, D2), 5 banana (E, D3)
AISLES = ["A", "B", "A", "C", "D", "E"]
DEPTS = ["D1", "D1", "D1", "D2", "D2", "D3"]
TRAIN = [[0, 1, 3], [0, 1], [0, 2, 5], [3, 4, 5], [5, 1], [5]]
COUNTS = np.array([3, 3, 1, 2, 1, 4])  # baskets containing each row


def test_counts_fixture_matches_project_item_counts():
    from bundlerec_export import complements as cmp

    assert cmp.item_counts(TRAIN, 6).tolist() == COUNTS.tolist()


def test_recall_at_k():
    assert bq.recall_at_k([1, 2, 3], {2, 9}, 1) == 0.0
    assert bq.recall_at_k([1, 2, 3], {2, 9}, 2) == 0.5
    # repeated ids are dropped before the cut at k (as benchmarks/metrics.py does)
    assert bq.recall_at_k([2, 2, 9], {2, 9}, 1) == 0.5
    assert bq.recall_at_k([2, 2, 9], {2, 9}, 2) == 1.0
    assert bq.recall_at_k([], {1}, 5) == 0.0
    assert bq.recall_at_k([1], set(), 5) is None


def test_popularity_within_department():
    rank = bq.popularity_ranker(COUNTS, DEPTS, AISLES, cross_aisle=False, kmax=10)
    assert list(rank(0)) == [1, 2]  # D1 by count desc (0:3, 1:3, 2:1), ties by row, anchor excluded
    assert list(rank(2)) == [0, 1]
    assert list(rank(4)) == [3]
    assert list(rank(5)) == []  # alone in its department
    cross = bq.popularity_ranker(COUNTS, DEPTS, AISLES, cross_aisle=True, kmax=10)
    assert list(cross(0)) == [1]  # yogurt shares milk's aisle
    assert list(bq.popularity_ranker(COUNTS, DEPTS, AISLES, False, kmax=1)(2)) == [0]


def test_popularity_global():
    rank = bq.popularity_ranker(COUNTS, None, AISLES, cross_aisle=False, kmax=3)
    assert list(rank(0)) == [5, 1, 3]
    assert list(rank(5)) == [0, 1, 3]
    zero = bq.popularity_ranker(np.array([0, 2, 1]), None, ["x", "y", "z"], False, kmax=5)
    assert list(zero(1)) == [2]  # never-bought items are never recommended


def test_cooccurrence_baseline():
    rank = bq.cooccurrence_ranker(TRAIN, COUNTS, AISLES, cross_aisle=False, kmax=10)
    # milk: cereal in 2 baskets; then 1 basket each, ties by popularity: banana (4), bread (2), yogurt (1)
    assert [int(r) for r in rank(0)] == [1, 5, 3, 2]
    assert [int(r) for r in rank(4)] == [5, 3]
    assert [int(r) for r in rank(1)] == [0, 5, 3]  # cereal: milk 2; banana 1 (pop 4) before bread 1 (pop 2)
    cross = bq.cooccurrence_ranker(TRAIN, COUNTS, AISLES, cross_aisle=True, kmax=10)
    assert [int(r) for r in cross(0)] == [1, 5, 3]
    assert [int(r) for r in bq.cooccurrence_ranker(TRAIN, COUNTS, AISLES, False, kmax=2)(0)] == [1, 5]


def test_targets_of():
    assert bq.targets_of([0, 1, 2, 5], 0, AISLES, "all") == {1, 2, 5}
    assert bq.targets_of([0, 1, 2, 5], 0, AISLES, "other_aisle") == {1, 5}
    with pytest.raises(ValueError):
        bq.targets_of([0], 0, AISLES, "nope")


def test_evaluate_completion_hand_computed():
    fixed = {0: [1, 9], 1: [], 2: [0, 1]}
    aisles = ["A", "B", "A"] + [""] * 7
    res = bq.evaluate_completion([[0, 1, 2]], {"m": lambda a: fixed[a]}, aisles, "other_aisle", ks=(1, 2))
    # anchor 0 -> targets {1}: R@1 1, R@2 1; anchor 1 -> {0, 2}, nothing ranked: 0; anchor 2 -> {1}: R@1 0, R@2 1
    m = res["methods"]["m"]
    assert res["pairs"] == 3 and res["pairs_without_target"] == 0 and res["anchors"] == 3
    assert m["recall"]["1"] == pytest.approx(1 / 3)
    assert m["recall"]["2"] == pytest.approx(2 / 3)
    assert m["pairs_empty"] == 1 and m["anchors_empty"] == 1 and m["pair_coverage"] == pytest.approx(2 / 3)
    assert m["recall_covered"]["1"] == pytest.approx(0.5)
    assert m["recall_covered"]["2"] == pytest.approx(1.0)
    res = bq.evaluate_completion([[0, 1, 2]], {"m": lambda a: fixed[a]}, aisles, "all", ks=(1, 2))
    # anchor 0 -> {1, 2}: .5/.5; anchor 1 -> 0; anchor 2 -> {0, 1}: .5/1
    assert res["methods"]["m"]["recall"]["1"] == pytest.approx(1 / 3)
    assert res["methods"]["m"]["recall"]["2"] == pytest.approx(0.5)
    # a basket whose two items share an aisle has no other-aisle target: both pairs skipped
    res = bq.evaluate_completion([[0, 2]], {"m": lambda a: fixed[a]}, aisles, "other_aisle", ks=(1,))
    assert res["pairs"] == 0 and res["pairs_without_target"] == 2 and res["methods"]["m"]["recall"]["1"] is None


def test_pair_records_long_tail_reads_the_deep_list_other_metrics_the_first_kmax():
    # items 0..7 in distinct aisles; 1, 2, 3 are "popular" (the head)
    aisles = [str(i) for i in range(8)]
    deep = {0: [1, 2, 3, 6, 5], 4: [], 5: [], 6: [], 7: []}
    popular = {1, 2, 3}
    rec = bq.pair_records([[0, 5, 6, 1]], lambda a: deep.get(a, []), aisles, "other_aisle", (2, 4), popular, kmax=3)
    i = int(np.flatnonzero(rec["anchor"] == 0)[0])
    # anchor 0: targets {5, 6, 1}; the first 3 = [1, 2, 3]: R@2 = 1/3 (item 1), R@4 (of a 3-item cut) = 1/3
    assert rec["r2"][i] == pytest.approx(1 / 3) and rec["r4"][i] == pytest.approx(1 / 3)
    # tail targets {5, 6}: the deep list without the head = [6, 5] -> 2/2; the top 3 without the head = [] -> 0
    assert rec["long_tail"][i] == pytest.approx(1.0)
    assert rec["long_tail_top"][i] == pytest.approx(0.0)
    # without kmax every metric reads the whole list: both long-tail views agree
    rec = bq.pair_records([[0, 5, 6, 1]], lambda a: deep.get(a, []), aisles, "other_aisle", (2, 4), popular)
    i = int(np.flatnonzero(rec["anchor"] == 0)[0])
    assert rec["r4"][i] == pytest.approx(1 / 3 + 1 / 3) and rec["long_tail_top"][i] == rec["long_tail"][i] == 1.0


def test_evaluate_with_real_baselines_hand_computed():
    rankers = {
        "pop_dept": bq.popularity_ranker(COUNTS, DEPTS, AISLES, False, kmax=3),
        "cooc": bq.cooccurrence_ranker(TRAIN, COUNTS, AISLES, False, kmax=3),
    }
    # test basket milk + bread + jam, targets "all":
    #   milk -> {3, 4}: pop_dept [1, 2] -> 0; cooc [1, 5, 3] -> R@1 0, R@3 1/2
    #   bread -> {0, 4}: pop_dept [4] -> 1/2 at R@1; cooc (every count 1, by popularity) [5, 0, 1] -> 0, 1/2
    res = bq.evaluate_completion([[0, 3, 4]], rankers, AISLES, "all", ks=(1, 3))
    cooc_bread = [int(r) for r in rankers["cooc"](3)]
    assert cooc_bread == [5, 0, 1]  # all count 1: banana (pop 4), then milk / cereal (pop 3, by row)
    #   jam -> {0, 3}: pop_dept [3] -> 1/2; cooc [5, 3] (3:1 pop 2, 5:1 pop 4) -> R@1 0, R@3 1/2
    pd, co = res["methods"]["pop_dept"], res["methods"]["cooc"]
    assert pd["recall"]["1"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert pd["recall"]["3"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert co["recall"]["1"] == pytest.approx(0.0)
    assert co["recall"]["3"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)


def test_split_is_deterministic_disjoint_and_sized():
    ids = [str(i) for i in range(1, 10001)]
    a = [bq.split_of_order(i) for i in ids]
    assert a == [bq.split_of_order(i) for i in ids]
    assert set(a) == {"train", "test"}
    assert 0.18 < a.count("test") / len(a) < 0.22
    assert sum(bq.split_of_order(i, test_pct=0) == "test" for i in ids) == 0
    assert sum(bq.split_of_order(i, test_pct=100) == "test" for i in ids) == len(ids)
    # a larger test share only moves orders train -> test
    b = [bq.split_of_order(i, test_pct=40) for i in ids]
    assert all(y == "test" for x, y in zip(a, b) if x == "test")
    # independent of Python's hash randomisation
    code = "from benchmarks import bundle_quality as bq; print(''.join('1' if bq.split_of_order(str(i)) == 'test' else '0' for i in range(200)))"
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == "".join("1" if bq.split_of_order(str(i)) == "test" else "0" for i in range(200))


def test_query_for_never_the_full_name():
    assert bq.query_for(("Organic Whole Milk", "milk", "dairy eggs"), "aisle") == "milk"
    assert bq.query_for(("Organic Whole Milk", "milk", "dairy eggs"), "head") == "Organic Whole"
    assert bq.query_for(("Whole Milk", "milk", "dairy eggs"), "head") == "Whole"
    assert bq.query_for(("Banana", "", ""), "aisle") == "Banana"  # one word: nothing shorter exists


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def tiny_instacart(tmp_path: Path) -> Path:
    d = tmp_path / "ic"
    d.mkdir()
    _write(d / "products.csv", ["product_id", "product_name", "aisle", "department"], [
        [1, "Whole Milk", "milk", "dairy"], [2, "Corn Flakes Cereal", "cereal", "breakfast"],
        [3, "Greek Yogurt", "yogurt", "dairy"], [4, "Sourdough Bread", "bread", "bakery"],
        [5, "Banana", "fresh fruits", "produce"], [6, "Never Ordered Thing", "misc", "other"],
    ])
    orders, items = [], []
    oid = 0
    for user in range(1, 9):
        for num in range(1, 4 + user % 2):
            oid += 1
            orders.append([oid, user, num, 1, 10, ""])
            basket = [1, 2, 5] if (oid % 3) else [1, 3, 4]
            items += [[oid, p, k + 1, 0] for k, p in enumerate(basket)]
    _write(d / "orders.csv", ["order_id", "user_id", "order_number", "order_dow", "order_hour_of_day",
                              "days_since_prior_order"], orders)
    _write(d / "order_items.csv", ["order_id", "product_id", "add_to_cart_order", "reordered"], items)
    return d


def test_prepare_artifact_data_leaves_out_targets(tiny_instacart: Path, tmp_path: Path):
    data = bq.load_instacart(tiny_instacart)
    assert set(data.products) == {"1", "2", "3", "4", "5"} and data.all_products == 6
    out = tmp_path / "prep"
    info = bq.prepare_artifact_data(data, tiny_instacart, out)
    users = bq.next_basket_users(data.orders)
    targets = {os_[-1].order_id for os_ in users.values()}
    assert info["target_orders_left_out"] == len(targets) == 8
    with open(out / "orders.csv") as fh:
        kept = {r["order_id"] for r in csv.DictReader(fh)}
    with open(out / "order_items.csv") as fh:
        kept_lines = {r["order_id"] for r in csv.DictReader(fh)}
    assert not kept & targets and not kept_lines & targets and kept == kept_lines
    assert len(kept) == len(data.orders) - len(targets)
    with open(out / "products.csv") as fh:
        assert {r["product_id"] for r in csv.DictReader(fh)} == set(data.products)


def test_next_basket_cases(tiny_instacart: Path):
    data = bq.load_instacart(tiny_instacart)
    cases = bq.next_basket_cases(data, max_users=5, query_from="aisle")
    assert len(cases) == 5 and cases == bq.next_basket_cases(data, max_users=5, query_from="aisle")
    by_id = {o.order_id: o for o in data.orders}
    for c in cases:
        target = by_id[c["order_id"]]
        assert target.order_number == max(o.order_number for o in data.orders if o.user_id == c["user_id"])
        assert c["query_item"] in c["targets"] and c["query"] == data.products[c["query_item"]][1]
        assert len(c["history"]) == len(set(c["history"])) <= 50


def test_main_end_to_end_offline(tiny_instacart: Path, tmp_path: Path):
    out_json, out_png, out_md = tmp_path / "bq.json", tmp_path / "bq.png", tmp_path / "bq.md"
    assert bq.main(["--data-dir", str(tiny_instacart), "--json", str(out_json), "--plot", str(out_png),
                    "--markdown", str(out_md), "--draws", "50"]) == 0
    res = json.loads(out_json.read_text())
    for label in ("user", "order"):
        view = res["views"][label]
        sp = view["split"]
        assert sp["train"] + sp["test"] == res["data"]["orders"] and sp["fit"] + sp["val"] == sp["train"]
        assert set(view["methods"]) == set(bq.METHODS)
        for m in view["methods"].values():
            for key in bq.METRICS:
                v = m[key]["mean"]
                assert v is None or 0.0 <= v <= 1.0
                assert v is None or m[key]["ci95"][0] <= v + 1e-12 <= m[key]["ci95"][1] + 2e-12
            assert 0.0 <= m["coverage"] <= 1.0
        assert view["methods"]["cooccurrence"]["ratio_vs_cooccurrence"]["r5"]["ratio"] in (None, 1.0)
    assert res["views"]["user"]["split"]["test"] == 8  # one test basket per shopper
    assert "personal_learned" in res["personalization"]["methods"]
    assert out_png.stat().st_size > 0 and "| learned |" in out_md.read_text()


def test_merge_results_and_from_json(tmp_path: Path):
    a = {"config": {"views": "user"}, "data": {"orders": 3}, "views": {"user": {"x": 1}}, "personalization": {"p": 1}}
    b = {"config": {"views": "order"}, "data": {"orders": 3}, "views": {"order": {"y": 2}}}
    m = bq.merge_results([a, b])
    assert set(m["views"]) == {"user", "order"} and m["personalization"] == {"p": 1} and m["data"] == {"orders": 3}
    with pytest.raises(SystemExit):
        bq.main([])  # neither --data-dir nor --from-json


def test_history_validation_split_never_mines_test_or_validation(tiny_instacart: Path):
    data = bq.load_instacart(tiny_instacart)
    test, val, mined = bq.history_validation_split(data)
    users = bq.next_basket_users(data.orders)
    assert set(test) == set(val) == set(users)
    mined_ids = {o.order_id for o in mined}
    for u, os_ in users.items():
        assert test[u].order_id == os_[-1].order_id and val[u].order_id == os_[-2].order_id
        assert test[u].order_id not in mined_ids and val[u].order_id not in mined_ids
    assert len(mined) == len(data.orders) - 2 * len(users)
    # the validation baskets are training orders: the artifact's data keeps them, the test baskets it drops
    cases = bq.complement_cases(data, max_users=8)
    assert {c["user_id"] for c in cases} <= set(users)
    for c in cases:
        assert set(c["counts"]) == set(c["seen"])  # counts come only from orders before the test basket
    tuned = bq.tune_history(data)
    assert set(tuned["best"]) == {"ids", "counts", "decayed"} and tuned["validation_shoppers"] > 0


def test_order_ages_and_history_counts_by_hand():
    orders = [bq.Order("a", "u", 1, ["x", "y"], None), bq.Order("b", "u", 2, ["x"], 10.0),
              bq.Order("c", "u", 3, ["x", "z"], 5.0)]
    ages = bq.order_ages(orders)
    assert ages == [15.0, 5.0, 0.0]
    counts = bq.history_counts([o.items for o in orders], ages)
    assert counts == {"x": (3, 15.0, 0.0), "y": (1, 15.0, 15.0), "z": (1, 0.0, 0.0)}
