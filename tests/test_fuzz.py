"""Property-based fuzzing of the request space against the real server: never INTERNAL or UNKNOWN, and
health stays SERVING."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
ids = st.one_of(st.sampled_from(["196", "260", "13176", "", " 1", "x" * 200]), st.text(max_size=40))
queries = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["买一双好穿的鞋子", "🍝🍅 sauce", "صلصة المعكرونة", "ש", "\u200f\u202e", "a" * 600, " \t\n"]),
)
big = st.integers(min_value=0, max_value=2**32 - 1)
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
filters = st.builds(
    lambda inc, exc, price, ex_ids: pb.Filters(
        include_categories=inc, exclude_categories=exc, exclude_item_ids=ex_ids,
        **({} if price is None else {"max_bundle_price": price}),
    ),
    st.lists(st.text(max_size=20), max_size=3), st.lists(st.text(max_size=20), max_size=3), floats,
    st.lists(ids, max_size=5),
)
stamps = st.one_of(st.none(), st.builds(lambda sec, ns: timestamp_pb2.Timestamp(seconds=sec, nanos=ns),
                                        st.one_of(st.integers(-2**40, 2**40), st.integers(1_600_000_000, 1_900_000_000)),
                                        st.integers(0, 999_999_999)))
item_counts = st.lists(st.builds(
    lambda item, n, last, first: pb.ItemCount(item_id=item, count=n, **({} if last is None else {"last_seen": last}),
                                              **({} if first is None else {"first_seen": first})),
    ids, st.one_of(st.integers(0, 20), big), stamps, stamps), max_size=6)
modes = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(min_value=-5, max_value=1000))
recommend = st.builds(
    pb.RecommendRequest, query=queries, user_id=st.one_of(st.just(""), st.text(max_size=30), st.sampled_from(["u-1", "user:42"])),
    recent_item_ids=st.lists(ids, max_size=6), recent_item_counts=item_counts, max_bundles=st.one_of(st.integers(0, 60), big),
    max_items_per_bundle=st.one_of(st.integers(0, 12), big), filters=filters, retrieval_mode=modes,
)
search = st.builds(pb.SearchRequest, query=queries, k=st.one_of(st.integers(0, 120), big), retrieval_mode=modes, filters=filters)

COUNT = {"cases": 0}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.BundleRecommenderStub(ch), health_pb2_grpc.HealthStub(ch)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=recommend)
def test_fuzz_recommend(stub, req):
    rec, _ = stub
    code = _code(lambda: list(rec.Recommend(req, timeout=10)))
    COUNT["cases"] += 1
    assert code in ALLOWED, (code, req)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=search)
def test_fuzz_search(stub, req):
    rec, _ = stub
    code = _code(lambda: rec.Search(req, timeout=10))
    COUNT["cases"] += 1
    assert code in ALLOWED, (code, req)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.builds(pb.Event, user_id=st.text(max_size=20), item_id=ids, type=st.integers(0, 6)), max_size=5))
def test_fuzz_events(stub, events):
    rec, _ = stub
    code = _code(lambda: rec.RecordEvents(iter(events), timeout=10))
    COUNT["cases"] += 1
    assert code in ALLOWED, (code, events)


def test_health_still_serving_after_fuzzing(stub):
    _, health = stub
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    print(f"fuzz cases run: {COUNT['cases']}")
