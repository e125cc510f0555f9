"""CPU cost of each step of one Recommend call, in process (thread CPU time, one query at a time).

    python -m benchmarks.call_costs [--artifact artifacts/demo] [--n 200] [--queries benchmarks/queries/instacart.txt]

Prints milliseconds of this thread's CPU per call for: encoding one query (back to back; after a 10 ms pause, the
gap between calls at 100 RPS; and after 64 MB more have passed through the caches in that pause, as a server's
other work and the machine's neighbours do), per query in batches of 4,
tokenising, the request-limit token count, dense retrieval (and hnswlib's knn_query alone), Engine.recommend
(retrieval + bundling), building the 5 bundle messages, serialising them, parsing a request, and the 7 metric
updates a call makes. What issue 13's hop changes could and could not save is read from these.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec_server import convert, metrics
from bundlerec_server.domain import Filters, RecommendQuery
from bundlerec_server.engine import Engine
from bundlerec_server.settings import Settings


def cpu_ms(fn: Callable[[int], object], n: int, before: Callable[[], object] | None = None) -> float:
    """This thread's CPU ms per ``fn(i)``; ``before`` (a pause, a cache flush) runs untimed before each call."""
    total = 0.0
    for i in range(n):
        if before is not None:
            before()
        t = time.thread_time()
        fn(i)
        total += time.thread_time() - t
    return total / n * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--queries", type=Path, default=Path("benchmarks/queries/instacart.txt"), help="one query a line")
    args = p.parse_args()
    settings = Settings(artifact=args.artifact)
    e = Engine(args.artifact.resolve(), settings)
    e.warmup()
    queries = [line.strip() for line in open(args.queries) if line.strip()][: args.n]
    n = len(queries)
    vecs = [e.encoder.encode([q])[0] for q in queries]
    qs = [RecommendQuery(query=q, user_id="", recent_item_ids=(), max_bundles=5, items_per_bundle=3, filters=Filters(),
                         mode=None) for q in queries]
    bundles = [e.recommend(q, v) for q, v in zip(qs, vecs, strict=True)]
    msgs = [[convert.bundle_message(b, r, e.catalog) for r, b in enumerate(bs, 1)] for bs in bundles]

    def metric_updates(i: int) -> None:
        metrics.REQUESTS.labels("Recommend", "OK").inc()
        metrics.LATENCY.labels("Recommend").observe(0.01)
        metrics.FIRST_BUNDLE.observe(0.01)
        metrics.STOPS.labels("complete").inc()
        metrics.IN_FLIGHT.inc()
        metrics.IN_FLIGHT.dec()
        metrics.BATCH_SIZE.observe(1)

    flush = np.ones(8_000_000)  # 64 MB

    def pause_and_flush() -> None:
        time.sleep(0.01)
        flush.sum()

    rows: list[tuple[str, Callable[[int], object] | None, Callable[[], object] | None]] = [
        ("encode one query", lambda i: e.encoder.encode([queries[i]]), None),
        ("  the same after a 10 ms pause", lambda i: e.encoder.encode([queries[i]]), lambda: time.sleep(0.01)),
        ("  after a pause and 64 MB through the caches", lambda i: e.encoder.encode([queries[i]]), pause_and_flush),
        ("encode, per query in batches of 4", None, None),
        ("tokenize", lambda i: e.encoder.tokenize([queries[i]]), None),
        ("token count (request limit)", lambda i: e.check_tokens(queries[i]), None),
        ("dense retrieval (64 anchors)", lambda i: e.dense(vecs[i], 64, Filters()), None),
        ("  of which hnswlib knn_query", lambda i: e.vectors.index.knn_query(vecs[i], k=64), None),  # type: ignore[attr-defined]
        ("Engine.recommend (retrieval + bundling)", lambda i: e.recommend(qs[i], vecs[i]), None),
        ("  after a pause and 64 MB through the caches", lambda i: e.recommend(qs[i], vecs[i]), pause_and_flush),
        ("5 bundle messages", lambda i: [convert.bundle_message(b, r, e.catalog) for r, b in enumerate(bundles[i], 1)], None),
        ("serialise them", lambda i: [m.SerializeToString() for m in msgs[i]], None),
        ("parse + validate a request", lambda i: convert.recommend_query(pb.RecommendRequest(query=queries[i]), settings), None),
        ("7 metric updates", metric_updates, None),
    ]
    for name, fn, before in rows:
        if fn is None:
            t = time.thread_time()
            for i in range(0, n, 4):
                e.encoder.encode(queries[i : i + 4])
            ms = (time.thread_time() - t) / n * 1000
        else:
            ms = cpu_ms(fn, n, before)
        print(f"{name:<46} {ms:7.3f} ms CPU / call")


if __name__ == "__main__":
    main()
