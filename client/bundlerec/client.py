"""Typed sync and async clients for bundlerec.

    with Client("localhost:50051", timeout=2.0) as client:
        stream = client.recommend("pasta sauce", max_bundles=3)
        for bundle in stream:               # bundles arrive best-first as the server streams them
            print(bundle.rank, [i.title for i in bundle.items])
        print(stream.summary.stop_reason)   # why the stream ended

    async with AsyncClient("localhost:50051") as client:
        stream = client.recommend("pasta sauce")
        async for bundle in stream: ...

Every failure raises :class:`bundlerec.BundleRecError` (never a raw grpc.RpcError).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from .errors import BundleRecError, from_rpc_error
from .v1 import bundlerec_pb2 as pb
from .v1 import bundlerec_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MODES = {
    None: pb.RETRIEVAL_MODE_UNSPECIFIED, "default": pb.RETRIEVAL_MODE_UNSPECIFIED, "dense": pb.RETRIEVAL_MODE_DENSE,
    "lexical": pb.RETRIEVAL_MODE_LEXICAL, "hybrid": pb.RETRIEVAL_MODE_HYBRID,
}


@dataclass(frozen=True)
class TLS:
    """TLS settings: the CA that signed the server; a client certificate and key for mutual TLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def recommend_request(
    query: str,
    *,
    user_id: str = "",
    recent_item_ids: Sequence[str] = (),
    max_bundles: int = 0,
    max_items_per_bundle: int = 0,
    include_categories: Sequence[str] = (),
    exclude_categories: Sequence[str] = (),
    max_bundle_price: float | None = None,
    exclude_item_ids: Sequence[str] = (),
    retrieval_mode: str | None = None,
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        query=query, user_id=user_id, recent_item_ids=list(recent_item_ids), max_bundles=max_bundles,
        max_items_per_bundle=max_items_per_bundle,
        filters=filters(include_categories, exclude_categories, max_bundle_price, exclude_item_ids),
        retrieval_mode=MODES[retrieval_mode],
    )


def filters(
    include_categories: Sequence[str] = (),
    exclude_categories: Sequence[str] = (),
    max_price: float | None = None,
    exclude_item_ids: Sequence[str] = (),
) -> pb.Filters:
    f = pb.Filters(
        include_categories=list(include_categories), exclude_categories=list(exclude_categories),
        exclude_item_ids=list(exclude_item_ids),
    )
    if max_price is not None:
        f.max_bundle_price = max_price
    return f


def search_request(query: str, k: int = 10, retrieval_mode: str | None = None, **filter_args: Any) -> pb.SearchRequest:
    return pb.SearchRequest(query=query, k=k, retrieval_mode=MODES[retrieval_mode], filters=filters(**filter_args))


_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)
_Metadata = tuple[tuple[str, str | bytes], ...]


class _SyncStub(Protocol):
    """The generated BundleRecommenderStub over a grpc.Channel, typed (grpcio-tools emits no annotations for it)."""

    Recommend: grpc.UnaryStreamMultiCallable[pb.RecommendRequest, pb.RecommendResponse]
    Search: grpc.UnaryUnaryMultiCallable[pb.SearchRequest, pb.SearchResponse]
    GetInfo: grpc.UnaryUnaryMultiCallable[pb.GetInfoRequest, pb.GetInfoResponse]
    RecordEvents: grpc.StreamUnaryMultiCallable[pb.Event, pb.RecordEventsResponse]


class _AsyncStub(Protocol):
    """The generated BundleRecommenderStub over a grpc.aio.Channel, typed."""

    Recommend: grpc.aio.UnaryStreamMultiCallable[pb.RecommendRequest, pb.RecommendResponse]
    Search: grpc.aio.UnaryUnaryMultiCallable[pb.SearchRequest, pb.SearchResponse]
    GetInfo: grpc.aio.UnaryUnaryMultiCallable[pb.GetInfoRequest, pb.GetInfoResponse]
    RecordEvents: grpc.aio.StreamUnaryMultiCallable[pb.Event, pb.RecordEventsResponse]


def _stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    return pb_grpc.BundleRecommenderStub(channel)  # type: ignore[no-untyped-call]  # generated code, unannotated


class _Base:
    def __init__(self, target: str, timeout: float | None, tls: TLS | None, token: str | None) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = tls
        self.metadata: _Metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class _Stream:
    def __init__(self, call: _Cancellable) -> None:
        self._call = call
        self.summary: pb.StreamSummary | None = None

    def _bundle(self, msg: pb.RecommendResponse) -> pb.Bundle | None:
        """The bundle of a message, or None for the final summary (which it records)."""
        if msg.HasField("bundle"):
            return msg.bundle
        self.summary = msg.summary
        return None

    def cancel(self) -> None:
        self._call.cancel()


class RecommendStream(_Stream):
    """Iterator over the bundles of one Recommend call; :attr:`summary` is set once the stream has ended."""

    def __init__(self, call: grpc._CallIterator[pb.RecommendResponse]) -> None:
        super().__init__(call)
        self._messages = call

    def __iter__(self) -> Iterator[pb.Bundle]:
        try:
            for msg in self._messages:
                if (bundle := self._bundle(msg)) is not None:
                    yield bundle
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class AsyncRecommendStream(_Stream):
    """Async iterator over the bundles of one Recommend call; :attr:`summary` is set once it has ended."""

    def __init__(self, call: grpc.aio.UnaryStreamCall[pb.RecommendRequest, pb.RecommendResponse]) -> None:
        super().__init__(call)
        self._messages = call

    async def __aiter__(self) -> AsyncIterator[pb.Bundle]:
        try:
            async for msg in self._messages:
                if (bundle := self._bundle(msg)) is not None:
                    yield bundle
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class Client(_Base):
    """Blocking client. A context manager over one channel; ``timeout`` (seconds) applies to every call
    unless a call passes its own."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 10.0, tls: TLS | None = None, token: str | None = None) -> None:
        super().__init__(target, timeout, tls, token)
        if tls is None:
            self.channel = grpc.insecure_channel(target, options=channel_options())
        else:
            self.channel = grpc.secure_channel(target, tls.credentials(), options=channel_options())
        self.stub: _SyncStub = _stub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method: Callable[..., _Resp], request: _Req | Iterator[_Req], timeout: float | None) -> _Resp:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def recommend(self, query: str, *, timeout: float | None = None, **kwargs: Any) -> RecommendStream:
        """Starts a Recommend call; iterate the result for bundles (keyword args: see :func:`recommend_request`)."""
        call = self.stub.Recommend(recommend_request(query, **kwargs), timeout=self._timeout(timeout), metadata=self.metadata)
        return RecommendStream(call)

    def search(self, query: str, k: int = 10, *, retrieval_mode: str | None = None, timeout: float | None = None, **filter_args: Any) -> list[pb.SearchHit]:
        return list(self._unary(self.stub.Search, search_request(query, k, retrieval_mode, **filter_args), timeout).hits)

    def info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return self._unary(self.stub.GetInfo, pb.GetInfoRequest(), timeout)

    def record_events(self, events: Iterable[pb.Event], *, timeout: float | None = None) -> pb.RecordEventsResponse:
        return self._unary(self.stub.RecordEvents, iter(events), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ... (health stubs ship with grpcio-health-checking)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


class AsyncClient(_Base):
    """grpc.aio client with the same methods as :class:`Client`, as coroutines / async iterators."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 10.0, tls: TLS | None = None, token: str | None = None) -> None:
        super().__init__(target, timeout, tls, token)
        if tls is None:
            self.channel = grpc.aio.insecure_channel(target, options=channel_options())
        else:
            self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=channel_options())
        self.stub: _AsyncStub = _stub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method: Callable[..., Awaitable[_Resp]], request: _Req | Iterator[_Req], timeout: float | None) -> _Resp:
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def recommend(self, query: str, *, timeout: float | None = None, **kwargs: Any) -> AsyncRecommendStream:
        call = self.stub.Recommend(recommend_request(query, **kwargs), timeout=self._timeout(timeout), metadata=self.metadata)
        return AsyncRecommendStream(call)

    async def search(self, query: str, k: int = 10, *, retrieval_mode: str | None = None, timeout: float | None = None, **filter_args: Any) -> list[pb.SearchHit]:
        return list((await self._unary(self.stub.Search, search_request(query, k, retrieval_mode, **filter_args), timeout)).hits)

    async def info(self, *, timeout: float | None = None) -> pb.GetInfoResponse:
        return await self._unary(self.stub.GetInfo, pb.GetInfoRequest(), timeout)

    async def record_events(self, events: Iterable[pb.Event], *, timeout: float | None = None) -> pb.RecordEventsResponse:
        return await self._unary(self.stub.RecordEvents, iter(events), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


__all__ = ["Client", "AsyncClient", "RecommendStream", "AsyncRecommendStream", "TLS", "BundleRecError", "recommend_request", "search_request"]
