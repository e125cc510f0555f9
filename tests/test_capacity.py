"""benchmarks.capacity: the synthetic generator, recall, the extrapolation and the one-node limit, and tiny
end-to-end runs that write the JSON (no timing assertions: the figures depend on the machine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import capacity as cap


def test_synthetic_is_deterministic_normalised_and_a_prefix_of_larger_sets():
    a = cap.synthetic(12_500, dim=32, centres=50, seed=3)
    assert a.dtype == np.float32 and a.shape == (12_500, 32)
    np.testing.assert_array_equal(a, cap.synthetic(12_500, dim=32, centres=50, seed=3))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # crosses a block boundary: the first rows of a larger set are the smaller set
    np.testing.assert_array_equal(cap.synthetic(25_000, dim=32, centres=50, seed=3)[:12_500], a)
    assert not np.array_equal(cap.synthetic(100, dim=32, centres=50, seed=4), a[:100])
    assert not np.array_equal(cap.synthetic(100, dim=32, centres=50, seed=3, stream=1), a[:100])


def test_synthetic_is_clustered_unlike_uniform_vectors():
    x = cap.synthetic(2000, dim=384, centres=40, seed=0)
    u = np.random.default_rng(0).standard_normal((2000, 384)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)

    def nearest_cos(v):
        s = v @ v.T
        np.fill_diagonal(s, -1)
        return float(s.max(axis=1).mean())

    assert nearest_cos(x) > 0.5  # items have close neighbours (same cluster: ~0.64)
    assert nearest_cos(u) < 0.3  # uniform 384-d vectors are all nearly orthogonal


def test_recall_at_k_hand_case():
    truth = np.array([[1, 2, 9], [7, 8, 9]])
    assert cap.recall_at_k([[1, 2, 3], [4, 5, 6]], truth, k=3) == pytest.approx(1 / 3)
    assert cap.recall_at_k([[9, 2, 1], [9, 8, 7]], truth, k=3) == 1.0
    assert cap.recall_at_k([[1, 5], [7, 1]], truth, k=1) == 1.0
    with pytest.raises(ValueError):
        cap.recall_at_k([[1, 2, 3]], truth, k=3)


def test_exact_topk_matches_a_full_sort_across_chunks():
    data = cap.synthetic(1000, dim=16, centres=10, seed=1)
    q = cap.synthetic(7, dim=16, centres=10, seed=1, stream=1)
    want = np.argsort(-(q @ data.T), axis=1, kind="stable")[:, :10]
    got = cap.exact_topk(data, q, k=10, chunk=128)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
    np.testing.assert_array_equal(got[:, 0], want[:, 0])


def test_extrapolate_models():
    pts = [{"n": 1_000, "bytes": 1_000 * 100 + 500, "build_s": 1.0, "p50_ms": 0.1 + 0.01 * math.log(1_000), "p99_ms": 1.0},
           {"n": 10_000, "bytes": 10_000 * 100 + 500, "build_s": 10.0, "p50_ms": 0.1 + 0.01 * math.log(10_000), "p99_ms": 1.0}]
    (row,) = cap.extrapolate(pts, [1_000_000])
    assert row["bytes"] == pytest.approx(1_000_000 * 100 + 500, rel=1e-6)
    assert row["build_s"] == pytest.approx(10.0 * 100 * math.log(1e6) / math.log(1e4))  # N log N from the largest point
    assert row["p50_ms"] == pytest.approx(0.1 + 0.01 * math.log(1e6), rel=1e-6)
    assert row["p99_ms"] == pytest.approx(1.0)
    (one,) = cap.extrapolate(pts[1:], [100_000])  # one point: memory through the origin, latency ∝ ln N
    assert one["bytes"] == pytest.approx(100_000 * 100.05)
    assert one["p99_ms"] == pytest.approx(math.log(1e5) / math.log(1e4))


def test_one_node_limit_and_sq8():
    # 64 GiB x 0.75 - 4 GiB = 44 GiB; two copies during a reload: 22 GiB each
    assert cap.max_items(1024, 0, 64) == 22 * 1024**2
    assert cap.max_items(1024, 0, 64, copies=1) == 44 * 1024**2
    assert cap.max_items(1024, 0, 4) == 0
    assert cap.sq8_bytes_per_item(1700, 384) == 1700 - 3 * 384


def test_event_plan():
    store = {"bytes_per_row": 100.0, "writes": [{"events_per_s": 500.0}, {"events_per_s": 20_000.0}]}
    p = cap.event_plan(store, None, events_per_day=86_400_000)
    assert p["mean_events_per_s"] == 1000
    assert p["postgresql"]["gib_per_year"] == pytest.approx(round(100 * 86_400_000 * 365 / 1024**3, 1))
    assert p["postgresql"]["max_events_per_s"] == 20_000
    assert p["postgresql"]["max_events_per_s_smallest_batch"] == 500
    assert p["postgresql"]["peak_headroom"] == 2.0
    assert "sqlite" not in p


def test_event_rows_and_history_users():
    rows = cap.event_rows(3000, users=30, items=100, seed=0)
    assert rows == cap.event_rows(3000, users=30, items=100, seed=0)
    users = cap.history_users(rows, lo=20, hi=200)
    counts = {u: sum(r[0] == u for r in rows) for u in {r[0] for r in rows}}
    assert users and all(20 <= counts[u] <= 200 for u in users)
    assert sorted(users) == sorted(u for u, c in counts.items() if 20 <= c <= 200)


def _run(tmp_path, *extra):
    out = tmp_path / "cap"
    assert cap.main(["--sizes", "2000", "--dim", "64", "--centres", "40", "--queries", "30", "--events", "900",
                     "--event-users", "30", "--reads", "50", "--out", str(out), *extra]) == 0
    return out, json.loads((out / "capacity.json").read_text())


def test_end_to_end_hnsw_and_events(tmp_path):
    out, d = _run(tmp_path, "--parts", "hnsw,events")
    assert {"machine", "config", "hnsw", "milvus", "events", "plan"} <= d.keys()
    (h,) = d["hnsw"]
    assert h["n"] == 2000 and h["M"] == 16 and h["ef_construction"] == 200
    assert h["file_bytes_per_item"] > 64 * 4  # at least the fp32 vector
    assert {"32", "64", "128"} <= h["by_ef"].keys()
    assert 0.5 < h["by_ef"]["128"]["recall_at_10"] <= 1.0
    assert {"p50_ms", "p99_ms"} <= h["served"].keys()
    sq = d["events"]["sqlite"]
    assert sq["schema"] == "server" and sq["events"] == 900 and len(sq["writes"]) == 3
    assert sq["history_users"] > 0 and sq["history_read"]["n"] == 50
    pg = d["events"]["postgres"]
    assert "skipped" in pg or ("writes" in pg and pg["bytes_per_row"] > 0), pg
    plan = d["plan"]
    assert [r["n"] for r in plan["hnsw"]["rows"]] == [10_000_000, 100_000_000]
    assert plan["hnsw"]["one_node_max_items"]["128GiB"]["sq8"] > plan["hnsw"]["one_node_max_items"]["128GiB"]["fp32"]
    assert (out / "capacity.png").stat().st_size > 10_000
    assert (out / "parts" / "hnsw-2000.json").exists()
    assert not list(out.glob("work-*"))  # scratch removed
    md = (out / "capacity.md").read_text()
    assert "| hnswlib fp32, ef 64" in md and "| sqlite (WAL, synchronous=FULL)" in md and "| 100M |" in md


def test_reuse_takes_cached_parts(tmp_path):
    out, first = _run(tmp_path, "--parts", "hnsw")
    part = out / "parts" / "hnsw-2000.json"
    cached = json.loads(part.read_text())
    cached["build_s"] = 12345.0
    part.write_text(json.dumps(cached))
    _, again = _run(tmp_path, "--parts", "hnsw", "--reuse")
    assert again["hnsw"][0]["build_s"] == 12345.0
    assert first["hnsw"][0]["build_s"] != 12345.0


def test_end_to_end_milvus(tmp_path):
    why = cap.milvus_available()
    if why:
        pytest.skip(f"Milvus part not run: {why}")
    _, d = _run(tmp_path, "--parts", "milvus", "--milvus-indexes", "HNSW_SQ8")
    (m,) = d["milvus"]
    assert "error" not in m, m
    assert m["index"] == "HNSW_SQ8" and m["n"] == 2000
    assert 0.5 < m["recall_at_10"] <= 1.0
    assert m["disk_bytes"] > 0 and m["query"]["p50_ms"] > 0


def test_loads_collects_every_recorded_load_average():
    tree = {"loadavg_start": [3.0, 2.0, 1.0], "hnsw": [{"loadavg_build": [5.0, 0, 0], "build_progress": [[1, 2, 9.0]]}],
            "events": {"pg": {"writes": [{"loadavg": [7.0, 0, 0]}]}}}
    assert cap.loads(tree) == [3.0, 5.0, 7.0]
