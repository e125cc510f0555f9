"""Pure statistics of benchmarks.load: Poisson schedule, nearest-rank percentiles, aggregation, verdicts.
No timing assertions; no server."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.load import (
    highest_sustainable,
    latency_summary,
    load_queries,
    merge_records,
    percentile,
    poisson_schedule,
    split_round_robin,
    summarize,
    verdict,
)

# ---- schedule -----------------------------------------------------------------------------------


def test_schedule_mean_rate_over_long_seeded_schedule():
    rate, duration = 200.0, 600.0
    t = poisson_schedule(rate, duration, seed=7)
    expected = rate * duration  # 120000 arrivals; Poisson sd = sqrt(120000) = 346 (0.29%)
    assert abs(len(t) - expected) < 5 * math.sqrt(expected)
    assert len(t) / duration == pytest.approx(rate, rel=0.015)


def test_schedule_is_monotonic_and_within_window():
    t = poisson_schedule(50.0, 30.0, seed=1)
    assert len(t) > 0
    assert np.all(np.diff(t) > 0)
    assert t[0] >= 0.0 and t[-1] < 30.0


def test_schedule_gaps_are_exponential():
    rate = 100.0
    gaps = np.diff(poisson_schedule(rate, 500.0, seed=3))
    # exponential: mean 1/rate and coefficient of variation 1 (a fixed-interval clock would have CV 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)
    # P(gap > mean) = e^-1 = 0.3679
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.01)


def test_schedule_is_reproducible_per_seed():
    a = poisson_schedule(80.0, 10.0, seed=11)
    assert np.array_equal(a, poisson_schedule(80.0, 10.0, seed=11))
    assert not np.array_equal(a, poisson_schedule(80.0, 10.0, seed=12))


def test_schedule_degenerate_inputs():
    assert len(poisson_schedule(0.0, 10.0)) == 0
    assert len(poisson_schedule(10.0, 0.0)) == 0


def test_round_robin_split_covers_every_request_once():
    groups = split_round_robin(10, 3)
    assert [g.tolist() for g in groups] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(np.concatenate(groups).tolist()) == list(range(10))


# ---- percentiles --------------------------------------------------------------------------------


def test_nearest_rank_percentile_hand_computed():
    v = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]  # sorted 1..10, n = 10
    assert percentile(v, 50) == 5  # rank ceil(0.5 * 10) = 5 -> 5
    assert percentile(v, 90) == 9  # rank ceil(0.9 * 10) = 9 -> 9
    assert percentile(v, 99) == 10  # rank ceil(9.9) = 10 -> 10
    assert percentile(v, 100) == 10
    assert percentile(v, 0) == 1  # rank clamps to 1
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(v, 101)


def test_p99_of_1000_is_the_990th_value():
    v = np.arange(1, 1001, dtype=float)  # 1..1000
    assert percentile(v, 99) == 990.0  # rank ceil(0.99 * 1000) = 990
    assert percentile(v, 99.9) == 999.0


def test_latency_summary_ignores_nan():
    s = latency_summary([1.0, float("nan"), 3.0, 2.0])
    assert s["count"] == 3 and s["p50"] == 2.0 and s["max"] == 3.0 and s["mean"] == pytest.approx(2.0)
    empty = latency_summary([])
    assert empty["count"] == 0 and empty["p99"] is None and empty["max"] is None


# ---- aggregation --------------------------------------------------------------------------------


def records(codes, ttfb, total, done):
    return {"code": codes, "ttfb_ms": ttfb, "total_ms": total, "done_s": done, "bundles": [1] * len(codes)}


def test_summarize_hand_computed():
    nan = float("nan")
    r = records(
        ["OK", "OK", "OK", "UNAVAILABLE", "OK"],
        [1.0, 2.0, nan, nan, 4.0],  # the third OK call streamed no bundle
        [10.0, 20.0, 30.0, 5000.0, 40.0],
        [0.5, 1.0, 1.5, 6.5, 1.9],
    )
    s = summarize(r, offered_rps=2.5, duration=2.0)
    assert s["requests"] == 5 and s["ok"] == 4
    assert s["scheduled_rps"] == pytest.approx(2.5)  # 5 arrivals / 2 s
    # the last completion (6.5 s) stretches the window: 4 OK / 6.5 s
    assert s["window_s"] == pytest.approx(6.5)
    assert s["achieved_rps"] == pytest.approx(4 / 6.5)
    assert s["achieved_ratio"] == pytest.approx((4 / 6.5) / 2.5)
    assert s["error_rate"] == pytest.approx(0.2)
    assert s["errors"] == {"UNAVAILABLE": 1}
    # latency over OK calls only: full [10, 20, 30, 40] -> p50 rank 2 = 20; ttfb finite [1, 2, 4] -> p50 2
    assert s["full_ms"]["p50"] == 20.0 and s["full_ms"]["max"] == 40.0
    assert s["ttfb_ms"]["count"] == 3 and s["ttfb_ms"]["p50"] == 2.0
    assert s["no_bundle_ok"] == 1


def test_summarize_keeps_up_window_is_the_duration():
    r = records(["OK"] * 4, [1.0] * 4, [2.0] * 4, [0.1, 0.6, 1.1, 1.6])
    s = summarize(r, offered_rps=2.0, duration=2.0)
    assert s["window_s"] == 2.0 and s["achieved_rps"] == 2.0 and s["achieved_ratio"] == 1.0


def test_merge_records_concatenates_workers():
    a = records(["OK"], [1.0], [2.0], [0.1])
    b = records(["OK", "CANCELLED"], [3.0, float("nan")], [4.0, 9.0], [0.2, 0.3])
    m = merge_records([a, b])
    assert m["code"] == ["OK", "OK", "CANCELLED"] and m["total_ms"] == [2.0, 4.0, 9.0]


def _result(rate, ratio=1.0, err=0.0, p99=10.0, n=100):
    return {"offered_rps": rate, "requests": n, "achieved_ratio": ratio, "error_rate": err,
            "full_ms": {"p99": p99}}


def test_verdict_thresholds():
    assert verdict(_result(100), 50)[0]
    assert verdict(_result(100, ratio=0.95), 50)[0]  # exactly 95% passes
    ok, why = verdict(_result(100, ratio=0.94), 50)
    assert not ok and "achieved" in why[0]
    assert not verdict(_result(100, err=0.01), 50)[0]  # 1% is not < 1%
    assert verdict(_result(100, err=0.009), 50)[0]
    assert verdict(_result(100, p99=50.0), 50)[0]
    assert not verdict(_result(100, p99=50.1), 50)[0]
    assert not verdict(_result(100, p99=None), 50)[0]
    ok, why = verdict(_result(100, ratio=0.5, err=0.5, p99=999), 50)
    assert not ok and len(why) == 3


def test_highest_sustainable():
    rs = [dict(_result(25), sustainable=True), dict(_result(50), sustainable=True),
          dict(_result(100), sustainable=False)]
    assert highest_sustainable(rs) == 50
    assert highest_sustainable([dict(_result(25), sustainable=False)]) is None


# ---- queries ------------------------------------------------------------------------------------


def test_load_queries_txt_and_csv(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("# comment\nmilk\n\n bananas \n")
    assert load_queries(txt) == ["milk", "bananas"]
    csv_path = tmp_path / "judgments.csv"
    csv_path.write_text("query,product_id,relevance\nangle bracket,1,3\nangle bracket,2,2\nl bracket,1,2.5\n")
    assert load_queries(csv_path) == ["angle bracket", "l bracket"]


def test_committed_instacart_queries():
    qs = load_queries(Path(__file__).resolve().parent.parent / "benchmarks" / "queries" / "instacart.txt")
    assert 200 <= len(qs) <= 1000
    assert len(set(qs)) == len(qs)
    assert all(1 <= len(q.split()) <= 5 for q in qs)  # head terms 1-3 words, aisle names up to 5
    assert sum(len(q.split()) <= 3 for q in qs) / len(qs) > 0.9


def _phase_run(phase, cycle, p99, server_p99, shed=0, shed_p99=None, requests=100):
    codes = {"RESOURCE_EXHAUSTED": shed} if shed else {}
    return {"phase": phase, "cycle": cycle, "requests": requests, "achieved_rps": float(requests - shed),
            "full_ms": {"p99": p99}, "server_ms": {"p99": server_p99}, "errors": codes,
            "error_ms": {"RESOURCE_EXHAUSTED": {"p50": shed_p99 / 2, "p99": shed_p99}} if shed else {}}


def test_overload_summary_takes_medians_over_cycles_and_the_2r_ratio():
    from benchmarks.overload import summarize_phases

    runs = [
        _phase_run("steady R", 1, 40.0, 30.0), _phase_run("overload 2R", 1, 48.0, 33.0, shed=40, shed_p99=9.0),
        _phase_run("recovery R/2", 1, 20.0, 15.0),
        _phase_run("steady R", 2, 60.0, 34.0), _phase_run("overload 2R", 2, 50.0, 35.0, shed=50, shed_p99=11.0),
        _phase_run("recovery R/2", 2, 22.0, 16.0),
        _phase_run("steady R", 3, 50.0, 32.0, shed=1, shed_p99=3.0), _phase_run("overload 2R", 3, 90.0, 60.0, shed=45, shed_p99=10.0),
        _phase_run("recovery R/2", 3, 24.0, 17.0),
    ]
    s = summarize_phases(runs)
    assert s["steady R"]["full_p99_ms"] == 50.0 and s["overload 2R"]["full_p99_ms"] == 50.0  # medians, not means
    assert s["overload 2R"]["shed_fraction"] == pytest.approx(0.45) and s["overload 2R"]["shed_p99_ms"] == 10.0
    assert s["steady R"]["shed_fraction"] == 0.0 and s["steady R"]["shed_p99_ms"] == 3.0
    assert s["ratios"]["full_p99_ms 2R/R"] == pytest.approx(1.0)
    assert s["ratios"]["server_p99_ms 2R/R"] == pytest.approx(35.0 / 32.0)
    assert s["recovery R/2"]["cycles"] == 3 and s["recovery R/2"]["other_errors"] == 0
