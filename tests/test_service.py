"""The servicer's one policy for every RPC (statuses, metrics) and the runtime's engine + batcher pair."""

from __future__ import annotations

import dataclasses
import types

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec_server.errors import NotFound, abort_with
from bundlerec_server.runtime import Runtime
from bundlerec_server.service import BundleRecommenderServicer, observed
from bundlerec_server.settings import Settings


def requests(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("bundlerec_requests_total", {"method": method, "code": code}) or 0.0


def timed(method: str) -> float:
    return REGISTRY.get_sample_value("bundlerec_request_seconds_count", {"method": method}) or 0.0


class Context:
    """A servicer context whose abort records the status and raises, as grpc's does (or returns, if told to)."""

    def __init__(self, raises: bool = True) -> None:
        self.raises, self.codes = raises, []

    def time_remaining(self):
        return None

    async def abort_with_status(self, status):
        self.codes.append(status.code)
        if self.raises:
            raise grpc.aio.AbortError()

    async def abort(self, code, details=""):
        self.codes.append(code)
        if self.raises:
            raise grpc.aio.AbortError()


async def test_abort_with_never_returns_even_if_abort_does():
    ctx = Context(raises=False)
    with pytest.raises(RuntimeError, match="returned"):
        await abort_with(ctx, NotFound("gone"))
    with pytest.raises(RuntimeError, match="returned"):
        await abort_with(ctx, ValueError("a bug"))
    assert ctx.codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL]


def test_get_info_calls_are_counted_and_timed(client):
    before, before_t = requests("GetInfo", "OK"), timed("GetInfo")
    assert client.info().item_count > 0
    client.info()
    assert requests("GetInfo", "OK") == before + 2
    assert timed("GetInfo") == before_t + 2


async def test_a_failing_get_info_is_counted_with_its_status():
    rt = Runtime(Settings(provider="cpu"))  # nothing loaded: UNAVAILABLE
    try:
        before = requests("GetInfo", "UNAVAILABLE")
        ctx = Context()
        with pytest.raises(grpc.aio.AbortError):
            await BundleRecommenderServicer(rt).GetInfo(pb.GetInfoRequest(), ctx)
        assert ctx.codes == [grpc.StatusCode.UNAVAILABLE]
        assert requests("GetInfo", "UNAVAILABLE") == before + 1
    finally:
        await rt.close()


async def test_observed_maps_unexpected_errors_to_internal_for_unary_and_streaming_handlers():
    class Servicer:
        @observed
        async def Boom(self, request, context):
            raise ValueError("a bug")

        @observed
        async def BoomStream(self, request, context):
            yield 1
            raise KeyError("a bug")

    before = requests("Boom", "INTERNAL"), requests("BoomStream", "INTERNAL")
    ctx = Context()
    with pytest.raises(grpc.aio.AbortError):
        await Servicer().Boom(None, ctx)
    got = []
    with pytest.raises(grpc.aio.AbortError):
        async for m in Servicer().BoomStream(None, ctx):
            got.append(m)
    assert got == [1] and ctx.codes == [grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL]
    assert (requests("Boom", "INTERNAL"), requests("BoomStream", "INTERNAL")) == (before[0] + 1, before[1] + 1)


class FakeEngine:
    batch_exact, variant = True, "fake"

    def __init__(self) -> None:
        self.encoder = types.SimpleNamespace(encode=lambda texts: np.zeros((len(texts), 2), dtype=np.float32))


async def test_swap_replaces_engine_and_batcher_together_and_retires_the_old_batcher():
    rt = Runtime(Settings(provider="cpu"))
    try:
        a, b = FakeEngine(), FakeEngine()
        assert rt.swap(a) is None
        first = rt.serving()
        assert first.engine is a and rt.engine() is a
        assert rt.swap(b) is a
        second = rt.serving()
        assert second.engine is b and second.batcher is not first.batcher
        assert first.batcher._retired and not second.batcher._retired
        await rt.encode(first, "still on the old engine", None)  # a call that took the old pair keeps it
        assert (first.batcher.encoded, second.batcher.encoded) == (1, 0)
        assert not hasattr(a, "batcher") and not hasattr(b, "batcher")  # engines are not touched
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.batcher = second.batcher
    finally:
        await rt.close()
