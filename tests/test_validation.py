"""Request validation: every violation reported with its field; valid Unicode always accepted."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec_server.convert import recommend_query, search_query
from bundlerec_server.domain import Mode
from bundlerec_server.errors import InvalidRequest, to_status
from bundlerec_server.settings import Settings

S = Settings()


def violations(req) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as info:
        recommend_query(req, S)
    return {v.field: v.description for v in info.value.violations}


def test_defaults_applied():
    q = recommend_query(pb.RecommendRequest(query="  pasta sauce "), S)
    assert q.query == "pasta sauce"
    assert q.max_bundles == S.default_max_bundles and q.items_per_bundle == S.default_items_per_bundle
    assert q.mode is None


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_blank_query_rejected(query):
    assert "query" in violations(pb.RecommendRequest(query=query))


def test_all_violations_reported_at_once():
    req = pb.RecommendRequest(
        query="x" * (S.max_query_chars + 1), user_id="bad id!", max_bundles=S.max_bundles_cap + 1,
        max_items_per_bundle=S.max_items_per_bundle_cap + 1, recent_item_ids=["ok", ""], retrieval_mode=99,
        filters=pb.Filters(max_bundle_price=-1, include_categories=[""], exclude_item_ids=["a"] * (S.max_excluded_items + 1)),
    )
    got = violations(req)
    assert set(got) == {
        "query", "user_id", "max_bundles", "max_items_per_bundle", "recent_item_ids[1]", "retrieval_mode",
        "filters.max_bundle_price", "filters.include_categories[0]", "filters.exclude_item_ids",
    }


def test_nan_price_rejected():
    assert "filters.max_bundle_price" in violations(pb.RecommendRequest(query="a", filters=pb.Filters(max_bundle_price=math.nan)))


def test_status_carries_bad_request_details():
    from google.rpc import error_details_pb2, status_pb2

    with pytest.raises(InvalidRequest) as info:
        recommend_query(pb.RecommendRequest(query=""), S)
    status = to_status(info.value)
    assert status.code.name == "INVALID_ARGUMENT"
    blob = dict(status.trailing_metadata)["grpc-status-details-bin"]
    detail = status_pb2.Status.FromString(blob).details[0]
    br = error_details_pb2.BadRequest()
    assert detail.Unpack(br)
    assert br.field_violations[0].field == "query"


def test_search_k_and_mode():
    q = search_query(pb.SearchRequest(query="milk", retrieval_mode=pb.RETRIEVAL_MODE_HYBRID), S)
    assert q.k == 10 and q.mode is Mode.HYBRID
    with pytest.raises(InvalidRequest):
        search_query(pb.SearchRequest(query="milk", k=S.max_search_k + 1), S)


@given(st.text(min_size=1, max_size=200).filter(lambda t: t.strip()))
def test_any_unicode_query_accepted(text):
    # CJK, emoji, right-to-left scripts, combining marks: never refused for being "unusual"
    q = recommend_query(pb.RecommendRequest(query=text), S)
    assert q.query == text.strip()


@pytest.mark.parametrize("text", ["买一双好穿的鞋子", "🍝 sauce", "صلصة المعكرونة", "שוקולד"])
def test_named_scripts_accepted(text):
    assert recommend_query(pb.RecommendRequest(query=text), S).query == text
