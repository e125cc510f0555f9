"""bundlerec_export.evaluation against hand-computed examples, and the query split's determinism/disjointness."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from bundlerec_export.evaluation import (
    SPLITS,
    aggregate,
    dcg,
    mrr_at_k,
    ndcg_at_k,
    normalize_query,
    query_metrics,
    recall_at_k,
    split_of,
)

# One query judged on four products (Home Depot scale 1..3). Gains = relevance - 1:
#   a: 3 -> 2,   b: 2 -> 1,   c: 1 -> 0,   d: 2.5 -> 1.5     relevant (>= 2.5): {a, d}
JUDGED = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 2.5}
# Ranked list: b, x (unjudged -> gain 0), a, c
RANKED = ["b", "x", "a", "c"]
LOG2_3 = math.log2(3)  # 1.5849625...


def test_dcg_discounts_by_log2_rank_plus_one():
    # 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.2618595 + 0.5
    assert dcg([3, 2, 1]) == pytest.approx(3 + 2 / LOG2_3 + 0.5)
    assert dcg([]) == 0.0


def test_ndcg_at_10_hand_computed():
    # DCG  = 1/log2(2) + 0/log2(3) + 2/log2(4) + 0/log2(5) = 1 + 0 + 1 + 0 = 2.0
    # IDCG from ALL judged gains sorted [2, 1.5, 1, 0]:
    #      = 2/1 + 1.5/log2(3) + 1/log2(4) + 0 = 2 + 0.9463946 + 0.5 = 3.4463946
    # NDCG = 2.0 / 3.4463946 = 0.5803166
    expected = 2.0 / (2 + 1.5 / LOG2_3 + 0.5)
    assert ndcg_at_k(RANKED, JUDGED, k=10) == pytest.approx(expected)
    assert expected == pytest.approx(0.5803166, abs=1e-7)


def test_ndcg_at_2_truncates_both_dcg_and_ideal():
    # DCG@2  = 1/1 + 0/log2(3) = 1
    # IDCG@2 = 2/1 + 1.5/log2(3) = 2.9463946
    # NDCG@2 = 1 / 2.9463946 = 0.3393978
    assert ndcg_at_k(RANKED, JUDGED, k=2) == pytest.approx(1 / (2 + 1.5 / LOG2_3))


def test_ndcg_ideal_counts_judged_products_that_were_not_retrieved():
    # Retrieving only the best item: DCG = 2/1 = 2; IDCG@10 = 3.4463946 (d, b and c still count)
    assert ndcg_at_k(["a"], JUDGED, k=10) == pytest.approx(2 / (2 + 1.5 / LOG2_3 + 0.5))
    # The ideal order gives exactly 1
    assert ndcg_at_k(["a", "d", "b", "c"], JUDGED, k=10) == pytest.approx(1.0)


def test_ndcg_undefined_when_every_gain_is_zero():
    # all judged relevance 1 -> every gain 0 -> IDCG 0 -> None (excluded from the mean)
    assert ndcg_at_k(["p"], {"p": 1.0, "q": 1.0}, k=10) is None


def test_unjudged_items_gain_nothing_and_duplicates_count_once():
    # ["x", "y"] are unjudged -> DCG 0 -> NDCG 0
    assert ndcg_at_k(["x", "y"], JUDGED, k=10) == 0.0
    # ["a", "a", "d"] dedups to ["a", "d"]: DCG = 2 + 1.5/log2(3); IDCG = 2 + 1.5/log2(3) + 0.5
    assert ndcg_at_k(["a", "a", "d"], JUDGED, k=10) == pytest.approx((2 + 1.5 / LOG2_3) / (2 + 1.5 / LOG2_3 + 0.5))
    # and a repeated relevant item is not found twice: recall 1/2, not 2/2
    assert recall_at_k(["a", "a"], JUDGED, k=10) == pytest.approx(0.5)


def test_recall_hand_computed():
    # relevant = {a (3.0), d (2.5)}; top-10 of RANKED holds a only -> 1/2
    assert recall_at_k(RANKED, JUDGED, k=10) == pytest.approx(0.5)
    # top-2 = [b, x] -> 0/2
    assert recall_at_k(RANKED, JUDGED, k=2) == 0.0
    # 2.5 is relevant (threshold inclusive): [d, a] -> 2/2
    assert recall_at_k(["d", "a"], JUDGED, k=2) == 1.0


def test_mrr_hand_computed():
    # first relevant (a) at rank 3 -> 1/3
    assert mrr_at_k(RANKED, JUDGED, k=10) == pytest.approx(1 / 3)
    # not within the top 2 -> 0
    assert mrr_at_k(RANKED, JUDGED, k=2) == 0.0
    # d at rank 1 -> 1
    assert mrr_at_k(["d"], JUDGED, k=10) == 1.0


def test_queries_without_relevant_products_are_excluded_and_counted():
    no_rel = {"p": 2.0, "q": 1.0}  # max relevance 2 < 2.5
    m = query_metrics(["p"], no_rel, k=10)
    assert m["recall"] is None and m["mrr"] is None
    # NDCG is defined: gain(p) = 1, ideal [1, 0] -> 1/1 = 1
    assert m["ndcg"] == pytest.approx(1.0)

    agg = aggregate([query_metrics(RANKED, JUDGED, 10), m])
    assert agg["queries"] == 2
    # NDCG mean over both: (0.5803166 + 1.0) / 2
    assert agg["ndcg"] == pytest.approx((2.0 / (2 + 1.5 / LOG2_3 + 0.5) + 1.0) / 2)
    # Recall / MRR over the one query that has relevant products
    assert agg["recall"] == pytest.approx(0.5) and agg["recall_excluded"] == 1
    assert agg["mrr"] == pytest.approx(1 / 3) and agg["mrr_excluded"] == 1
    assert agg["ndcg_excluded"] == 0


def test_aggregate_of_nothing():
    agg = aggregate([])
    assert agg["queries"] == 0 and agg["ndcg"] is None and agg["recall"] is None


def test_normalize_query():
    assert normalize_query("  Angle \t  BRACKET\n") == "angle bracket"


def test_split_is_deterministic_and_normalised():
    for q in ["angle bracket", "whole milk", "1 1/2 gr nail", "ñandú", "牛奶"]:
        s = split_of(q)
        assert s in SPLITS
        assert split_of(q) == s
        if q.upper().lower() == q:  # case round-trips (not e.g. German ß)
            assert split_of(f"  {q.upper()}   ") == s


def test_split_is_stable_across_versions():
    # pinned: a change of hash or normalisation would silently reshuffle train/dev/test
    assert split_of("angle bracket") == "train"
    assert split_of("1 1/4 sink drain kit") == "dev"
    assert split_of("1 1/2 gr nail") == "test"
    assert split_of("1  1/2 GR Nail ") == "test"


def test_split_fractions_close_to_80_10_10():
    counts = Counter(split_of(f"query number {i}") for i in range(20000))
    # binomial sd for p=0.1, n=20000 is 42 (0.21%): allow ~5 sd
    assert counts["train"] / 20000 == pytest.approx(0.8, abs=0.012)
    assert counts["dev"] / 20000 == pytest.approx(0.1, abs=0.01)
    assert counts["test"] / 20000 == pytest.approx(0.1, abs=0.01)


def test_split_custom_fractions_and_validation():
    counts = Counter(split_of(f"q{i}", dev=0.0, test=0.5) for i in range(4000))
    assert counts["dev"] == 0 and 0.45 < counts["test"] / 4000 < 0.55
    with pytest.raises(ValueError):
        split_of("x", dev=0.6, test=0.6)


def test_splits_are_disjoint_partition():
    queries = [f"item {i} for {j}" for i in range(300) for j in ("kitchen", "garden", "bath")]
    by_split = {s: {normalize_query(q) for q in queries if split_of(q) == s} for s in SPLITS}
    assert not (by_split["train"] & by_split["dev"])
    assert not (by_split["train"] & by_split["test"])
    assert not (by_split["dev"] & by_split["test"])
    assert set().union(*by_split.values()) == {normalize_query(q) for q in queries}


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40), st.sampled_from(["", " ", "  \t", "\n"]))
    def test_split_ignores_surrounding_and_repeated_whitespace(q, pad):
        assert split_of(pad + q + pad) == split_of(q)
        assert split_of(q.replace(" ", "   ")) == split_of(q)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(list("abcdefgh")), max_size=12, unique=True),
           st.dictionaries(st.sampled_from(list("abcdefgh")), st.sampled_from([1.0, 1.33, 2.0, 2.5, 3.0]),
                           min_size=1))
    def test_metric_ranges(ranked, judged):
        m = query_metrics(ranked, judged, k=5)
        for v in m.values():
            assert v is None or 0.0 <= v <= 1.0 + 1e-12


# ----------------------------------------------------------------------------------------------- judgments reader


def _judgments_csv(path, rows, header=("query", "product_id", "relevance")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_read_judgments_keeps_queries_as_written_and_the_higher_duplicate(tmp_path):
    from bundlerec_export.evaluation import read_judgments

    path = _judgments_csv(tmp_path / "j.csv", [
        (" Angle Bracket ", " p1 ", "3.0"), ("angle  bracket", "p1", "1.0"), ("angle  bracket", "p2", "2.5"),
        ("  ", "p3", "3"), ("drill", "p4", "1.67"), ("drill", "p4", "2.33"), ("drill", "p4", "2.0"),
    ])
    j = read_judgments(path)
    assert list(j) == ["Angle Bracket", "angle  bracket", "drill"]  # file order, stripped, empty query skipped
    assert j["Angle Bracket"] == {"p1": 3.0}
    assert j["angle  bracket"] == {"p1": 1.0, "p2": 2.5}
    assert j["drill"] == {"p4": 2.33}  # a pair listed three times keeps the highest relevance


def test_read_judgments_missing_column(tmp_path):
    from bundlerec_export.evaluation import read_judgments

    path = _judgments_csv(tmp_path / "j.csv", [("q", "p")], header=("query", "product_id"))
    with pytest.raises(ValueError, match=r"missing columns \['relevance'\]"):
        read_judgments(path)


def test_by_normalized_query_merges_spellings(tmp_path):
    from bundlerec_export.evaluation import by_normalized_query, read_judgments

    path = _judgments_csv(tmp_path / "j.csv", [
        (" Angle Bracket ", "p1", "3.0"), ("angle  bracket", "p1", "1.0"), ("angle  bracket", "p2", "2.5"),
        ("drill", "p4", "2"),
    ])
    merged = by_normalized_query(read_judgments(path))
    assert merged == {"angle bracket": ("Angle Bracket", {"p1": 3.0, "p2": 2.5}), "drill": ("drill", {"p4": 2.0})}
    assert {split_of(k) for k in merged} <= set(SPLITS)


def test_benchmarks_quality_reads_through_the_export_reader(tmp_path):
    from benchmarks import metrics as bench_metrics
    from benchmarks import quality
    from bundlerec_export import evaluation

    path = _judgments_csv(tmp_path / "j.csv", [("Drill ", "p1", "3"), ("drill", "p2", "1.5"), ("saw", "p3", "2")])
    assert quality.read_judgments(path) == evaluation.by_normalized_query(evaluation.read_judgments(path))
    assert quality.select_split(quality.read_judgments(path), "all") == [("Drill", {"p1": 3.0, "p2": 1.5}),
                                                                         ("saw", {"p3": 2.0})]
    assert bench_metrics.ndcg_at_k is evaluation.ndcg_at_k and bench_metrics.split_of is evaluation.split_of
