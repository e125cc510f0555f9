"""The server's request limit (setting max_query_tokens) and the encoder's truncation (manifest) are distinct."""

from __future__ import annotations

from bundlerec_server.engine import DEFAULT_QUERY_TRUNCATE_TOKENS, query_truncate_tokens


def test_truncation_comes_from_the_new_key_then_the_old_one():
    assert query_truncate_tokens({"encoder": {"query_truncate_tokens": 48, "max_query_tokens": 99}}) == 48
    assert query_truncate_tokens({"encoder": {"max_query_tokens": 32}}) == 32  # artifacts built before the rename
    assert query_truncate_tokens({}) == DEFAULT_QUERY_TRUNCATE_TOKENS == 64


def test_served_encoder_truncates_at_the_manifest_length_not_the_request_limit(server):
    engine = server.app.runtime.engine()
    assert engine.encoder.max_length == query_truncate_tokens(engine.manifest) == 64
    assert server.settings.max_query_tokens == 128
