"""The compiled load generator (h2load over h2c) and the benchmark's CPU and counter plumbing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks import cpu, h2load
from benchmarks.load import QUERY_MIXES, choose_queries
from bundlerec.v1 import bundlerec_pb2 as pb

needs_h2load = pytest.mark.skipif(h2load.find() is None, reason="h2load not installed (apt-get install nghttp2-client)")

H2LOAD_OUTPUT = """\
finished in 3.01s, 50.67 req/s, 63.35KB/s
requests: 152 total, 152 started, 152 done, 150 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 150 2xx, 0 3xx, 0 4xx, 2 5xx
traffic: 190.44KB (195009) total, 3.31KB (3392) headers (space savings 50.12%), 182.23KB (186607) data
                     min         max         mean         sd        +/- sd
time for request:      340us     26.77ms      9.33ms      4.80ms    68.42%
time for connect:      238us       371us       292us        57us    75.00%
"""


def test_body_round_trips_through_protobuf():
    body = h2load.recommend_body("organic baby spinach 🍋", max_bundles=7, items=2, mode=3)
    compressed, message = h2load.unframe(body)
    assert not compressed and body[0] == 0 and int.from_bytes(body[1:5], "big") == len(message) == len(body) - 5
    req = pb.RecommendRequest.FromString(message)
    assert (req.query, req.max_bundles, req.max_items_per_bundle, req.retrieval_mode) == ("organic baby spinach 🍋", 7, 2, 3)
    for bad in (b"", b"\x00\x00\x00\x00\x05abc", b"\x02\x00\x00\x00\x00"):
        with pytest.raises(ValueError):
            h2load.unframe(bad)


def test_h2load_summary_is_parsed():
    got = h2load.parse_output(H2LOAD_OUTPUT)
    assert got["elapsed_s"] == 3.01 and got["req_per_s"] == 50.67
    assert got["requests"]["done"] == 152 and got["requests"]["failed"] == 2 and got["status"]["5xx"] == 2
    assert got["time_for_request_ms"] == pytest.approx({"min": 0.34, "max": 26.77, "mean": 9.33, "sd": 4.8})


def test_command_is_loopback_only_and_bounded(tmp_path):
    argv = h2load.command("h2load", "127.0.0.1:5", tmp_path / "b", 100, 10, 4, 5.0, tmp_path / "l")
    assert argv[argv.index("--rps") + 1] == "25" and "-D" in argv and "grpc-timeout: 5000m" in argv
    assert argv[-1] == "http://127.0.0.1:5/bundlerec.v1.BundleRecommender/Recommend"
    assert "-n" in h2load.command("h2load", "127.0.0.1:5", tmp_path / "b", 10, 1, 1, 5.0, tmp_path / "l", requests=3)
    with pytest.raises(ValueError):
        h2load.command("h2load", "10.0.0.1:5", tmp_path / "b", 100, 10, 4, 5.0, tmp_path / "l")
    with pytest.raises(ValueError):
        h2load.command("h2load", "127.0.0.1:5", tmp_path / "b", 100, 10_000, 4, 5.0, tmp_path / "l")


@needs_h2load
def test_a_tiny_h2load_run_gets_the_requested_responses(server, tmp_path):
    res = h2load.run(server.target, rate=40, duration=5, requests=12, connections=2, query="organic",
                     server_pid=os.getpid(), keep=tmp_path)
    assert res["http_2xx"] == 12 and res["h2load"]["requests"]["succeeded"] == 12
    assert res["probe"] == {"code": "OK", "bundles": res["probe"]["bundles"]} and res["probe"]["bundles"] >= 1
    assert res["full_ms"]["count"] == 12 and res["full_ms"]["p50"] > 0
    assert res["cpu"]["server_ms_per_call"] is not None and res["cpu"]["generator_s"] >= 0
    assert (tmp_path / "h2load-requests.tsv").read_text().count("\t200\t") == 12


def test_probe_reports_a_grpc_error_that_http_calls_success(server):
    body = h2load.recommend_body("x" * 10_000)  # longer than max_query_chars: INVALID_ARGUMENT, still HTTP 200
    assert h2load.probe(server.target, body)["code"] == "INVALID_ARGUMENT"


# --- CPU and counters --------------------------------------------------------------------------------


def test_cpu_of_a_process_and_its_children_from_proc():
    if not os.path.exists(f"/proc/{os.getpid()}/stat"):
        pytest.skip("no /proc")
    before = cpu.tree_cpu_s(os.getpid())
    np.linalg.svd(np.random.default_rng(0).random((300, 300)))  # burn a little CPU
    after = cpu.tree_cpu_s(os.getpid())
    assert before is not None and after is not None and after >= before
    assert cpu.process_cpu_s(2**22 + 12345) is None  # no such process
    window = cpu.CpuWindow(os.getpid()).start().stop()
    report = cpu.cpu_report(window, 0.5, 10)
    assert report["generator_ms_per_call"] == 50.0 and report["calls"] == 10 and report["loadavg"]


def test_counters_from_the_metrics_text():
    text = """# HELP bundlerec_requests_total Calls
bundlerec_requests_total{code="OK",method="Recommend"} 7.0
bundlerec_requests_total{code="DEADLINE_EXCEEDED",method="Recommend"} 2.0
bundlerec_requests_total{code="OK",method="Search"} 3.0
bundlerec_query_cache_hits_total 6.0
bundlerec_query_cache_misses_total 2.0
"""
    c = cpu.Counters(None)
    c.before, c.delta = {}, {k: v for k, v in cpu.parse_metrics(text).items()}
    assert c.codes("Recommend") == {"OK": 7, "DEADLINE_EXCEEDED": 2} and c.codes("Search") == {"OK": 3}
    assert c.cache() == {"hits": 6.0, "misses": 2.0, "hit_rate": 0.75, "reply_hits": 0.0, "reply_misses": 0.0,
                         "reply_hit_rate": None, "coalesced": 0.0}
    # a Search reply-cache hit skips the query cache's lookup: it is a hit of the query too
    search = c.delta | {"bundlerec_search_cache_hits_total": 12.0, "bundlerec_search_cache_misses_total": 4.0,
                        "bundlerec_search_cache_coalesced_total": 1.0, "bundlerec_query_cache_coalesced_total": 2.0}
    c.delta |= {"bundlerec_reply_cache_hits_total": 12.0, "bundlerec_reply_cache_misses_total": 4.0}  # so does a Recommend one
    assert c.cache() == {"hits": 18.0, "misses": 2.0, "hit_rate": 0.9, "reply_hits": 12.0, "reply_misses": 4.0,
                         "reply_hit_rate": 0.75, "coalesced": 0.0}
    c.delta = search
    assert c.cache() == {"hits": 18.0, "misses": 2.0, "hit_rate": 0.9, "reply_hits": 12.0, "reply_misses": 4.0,
                         "reply_hit_rate": 0.75, "coalesced": 3.0}
    with pytest.raises(ValueError):
        cpu.scrape("http://10.0.0.1:9100/")


def test_query_mixes():
    queries = [f"q{i}" for i in range(100)]
    assert set(QUERY_MIXES) == {"uniform", "zipf", "unique"}
    uniform = choose_queries(queries, 2000, "uniform", seed=3)
    rng = np.random.default_rng(4)  # the harness's historic draw: same stream as before the mixes existed
    assert uniform == [queries[j] for j in rng.integers(0, 100, size=2000)]
    unique = choose_queries(queries, 2000, "unique", seed=3)
    assert len(set(unique)) == 2000 and not set(unique) & set(choose_queries(queries, 2000, "unique", seed=4))
    zipf = choose_queries(queries, 20_000, "zipf", seed=3)
    counts = sorted(np.unique(zipf, return_counts=True)[1], reverse=True)
    harmonic = sum(1 / r for r in range(1, 101))
    assert counts[0] / 20_000 == pytest.approx(1 / harmonic, rel=0.1)  # Zipf(1): top share 1/H_100 ≈ 19 %
    assert choose_queries(queries, 50, "zipf", seed=3)[:5] != choose_queries(queries, 50, "zipf", seed=9)[:5]
    with pytest.raises(ValueError):
        choose_queries(queries, 5, "normal")


def test_sweep_rows_per_setting_and_generator_and_the_cpu_plot(tmp_path):
    from benchmarks import sweep
    from benchmarks.load import plot_latency

    assert sweep.real_settings([]) == [("real", "")]
    assert sweep.real_settings(["off=--query-cache-size 0"]) == [("real:off", "--query-cache-size 0")]
    lat = {"p50": 5.0, "p90": 6.0, "p99": 9.0, "mean": 5.5, "max": 12.0, "count": 10}
    py = {"offered_rps": 100.0, "achieved_rps": 99.0, "ttfb_ms": lat, "full_ms": lat, "error_rate": 0.0,
          "cpu": {"server_ms_per_call": 5.5, "generator_ms_per_call": 1.4, "loadavg": [9.0, 9.0, 9.0]},
          "query_cache": {"hit_rate": 0.85}, "sustainable": True}
    h2 = {**py, "ttfb_ms": None, "cpu": {"server_ms_per_call": 5.2, "generator_ms_per_call": 0.2, "loadavg": [8.0]},
          "query_cache": None}
    rows = sweep.generator_rows({"real:on": {"results": [py], "h2load": [h2]}})
    assert [(r["generator"], r["server_cpu_ms_per_call"], r["cache_hit_rate"]) for r in rows] == [
        ("python", 5.5, 0.85), ("h2load", 5.2, None)]
    assert rows[1]["full_p99_ms"] == 9.0 and rows[1]["ttfb_p50_ms"] is None
    sweep.print_generator_table(rows)
    plot_latency({"real:on": [py, {**py, "offered_rps": 200.0}]}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
