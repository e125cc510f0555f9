"""Typed sync and async clients for bundlerec.

    with Client("localhost:50051", timeout=2.0) as client:
        stream = client.recommend("pasta sauce", max_bundles=3)
        for bundle in stream:               # bundles arrive best-first as the server streams them
            print(bundle.rank, [i.title for i in bundle.items])
        print(stream.summary.stop_reason)   # why the stream ended

    async with AsyncClient("localhost:50051") as client:
        stream = client.recommend("pasta sauce")
        async for bundle in stream: ...

Replicas: pass several addresses (``Client(["10.0.0.5:50051", "10.0.0.6:50051"])``) or a ``dns:///`` name that
resolves to all of them (a Kubernetes headless Service): the channel balances calls round-robin and retries
UNAVAILABLE / RESOURCE_EXHAUSTED on another replica, honouring the server's pushback (see :func:`service_config`
and docs/replicas.md).

Every failure raises :class:`bundlerec.BundleRecError` (never a raw grpc.RpcError).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
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
# cross-encoder re-ranking: None = the server's default
RERANK = {None: pb.RERANK_UNSPECIFIED, True: pb.RERANK_ON, False: pb.RERANK_OFF}


@dataclass(frozen=True)
class TLS:
    """TLS settings: the CA that signed the server; a client certificate and key for mutual TLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


SERVICE = pb.DESCRIPTOR.services_by_name["BundleRecommender"].full_name
# Deadline of each method when neither the client nor the call gives one (seconds): a ceiling that keeps a
# caller from hanging, retries included (interactive calls take milliseconds; set your own SLO with
# timeouts=); RecordEvents may carry thousands of events into one durable transaction.
DEFAULT_TIMEOUTS: Mapping[str, float] = {"Recommend": 5.0, "Search": 5.0, "GetInfo": 5.0, "RecordEvents": 30.0}


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retries (the channel's service config): a failed attempt with one of ``codes`` is tried again,
    on the next replica (round-robin), after an exponential backoff with jitter, or after exactly the server's
    ``grpc-retry-pushback-ms`` when it sent one. At most ``max_attempts`` attempts in all (gRPC caps it at 5),
    always within the call's deadline. A server stream is retried only until its first response arrives.
    CANCELLED is in ``codes`` because a grpc.aio server cancels the calls that reach it while it shuts down (a
    draining replica); a call the caller cancels itself is never retried.
    ``methods`` are the idempotent ones: RecordEvents is left out (a connection lost after the server's COMMIT
    would store the events twice); gRPC still re-sends, transparently, a call that never reached a server."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 0.2
    backoff_multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED")
    methods: tuple[str, ...] = ("Recommend", "Search", "GetInfo")

    def config(self) -> dict[str, Any]:
        return {"maxAttempts": self.max_attempts, "initialBackoff": _duration(self.initial_backoff_s),
                "maxBackoff": _duration(self.max_backoff_s), "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.codes)}


def _duration(seconds: float) -> str:
    """A google.protobuf.Duration in its JSON form ("0.05s")."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(timeouts: Mapping[str, float] = DEFAULT_TIMEOUTS, retry: RetryPolicy | None = RetryPolicy(),
                   load_balancing: str = "round_robin") -> dict[str, Any]:
    """The gRPC service config the client's channel carries: ``load_balancing`` over every address the target
    resolves to, a deadline per method (``timeouts``, seconds: the longest a call may take; a call's own
    timeout can shorten it), and ``retry`` on the idempotent methods. ``json.dumps`` it for other gRPC clients."""
    methods = []
    for method, timeout in timeouts.items():
        entry: dict[str, Any] = {"name": [{"service": SERVICE, "method": method}], "timeout": _duration(timeout)}
        if retry is not None and method in retry.methods:
            entry["retryPolicy"] = retry.config()
        methods.append(entry)
    return {"loadBalancingConfig": [{load_balancing: {}}], "methodConfig": methods}


def resolve_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one or several replicas: a string passes as it is (``host:port``, ``dns:///name:port``,
    ``ipv4:a:p,b:p``); a list of ``ip:port`` addresses becomes ``ipv4:...`` (or ``ipv6:[..]:p,...``), over which
    the channel balances. Several host *names* cannot share one target: use a ``dns:///`` name resolving to all."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if len(addresses) == 1:
        return addresses[0]
    versions = set()
    for address in addresses:
        host = address.rpartition(":")[0].strip("[]")
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(f"{address!r}: a list of targets takes IP addresses (ip:port); for host names use one "
                             "'dns:///name:port' that resolves to every replica") from None
    if len(versions) != 1:
        raise ValueError("a list of targets mixes IPv4 and IPv6 addresses: gRPC takes one family per target")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def channel_options(config: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]
    if config is not None:
        options += [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
    return options


def _timestamp(value: datetime.datetime | float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("use a timezone-aware datetime (e.g. datetime.now(timezone.utc))")
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(round(float(value) * 1e9)))
    return ts


def item_count(item_id: str, count: int, last_seen: datetime.datetime | float | None = None,
               first_seen: datetime.datetime | float | None = None) -> pb.ItemCount:
    """One entry of ``recent_item_counts``: how often the shopper bought ``item_id`` and, optionally, when last
    and first (timezone-aware datetimes or seconds since the epoch); the server decays older purchases."""
    msg = pb.ItemCount(item_id=item_id, count=count)
    if last_seen is not None:
        msg.last_seen.CopyFrom(_timestamp(last_seen))
    if first_seen is not None:
        msg.first_seen.CopyFrom(_timestamp(first_seen))
    return msg


def _item_counts(values: Iterable[pb.ItemCount] | Mapping[str, int]) -> list[pb.ItemCount]:
    if isinstance(values, Mapping):
        return [pb.ItemCount(item_id=k, count=v) for k, v in values.items()]
    return list(values)


def recommend_request(
    query: str,
    *,
    user_id: str = "",
    recent_item_ids: Sequence[str] = (),
    recent_item_counts: Iterable[pb.ItemCount] | Mapping[str, int] = (),
    max_bundles: int = 0,
    max_items_per_bundle: int = 0,
    include_categories: Sequence[str] = (),
    exclude_categories: Sequence[str] = (),
    max_bundle_price: float | None = None,
    exclude_item_ids: Sequence[str] = (),
    retrieval_mode: str | None = None,
    rerank: bool | None = None,
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        query=query, user_id=user_id, recent_item_ids=list(recent_item_ids),
        recent_item_counts=_item_counts(recent_item_counts), max_bundles=max_bundles,
        max_items_per_bundle=max_items_per_bundle,
        filters=filters(include_categories, exclude_categories, max_bundle_price, exclude_item_ids),
        retrieval_mode=MODES[retrieval_mode], rerank=RERANK[rerank],
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


def search_request(query: str, k: int = 10, retrieval_mode: str | None = None, rerank: bool | None = None,
                   **filter_args: Any) -> pb.SearchRequest:
    return pb.SearchRequest(query=query, k=k, retrieval_mode=MODES[retrieval_mode], filters=filters(**filter_args),
                            rerank=RERANK[rerank])


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
    def __init__(self, target: str | Sequence[str], timeout: float | None, tls: TLS | None, token: str | None,
                 timeouts: Mapping[str, float] | None, retry: RetryPolicy | None, reissue: int) -> None:
        self.target = resolve_target(target)
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        if timeout is not None:
            self.timeouts = dict.fromkeys(self.timeouts, timeout)
        self.service_config = service_config(self.timeouts, retry)
        self.tls = tls
        self.reissue = reissue
        self.metadata: _Metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _timeout(self, method: str, timeout: float | None) -> float:
        return self.timeouts[method] if timeout is None else timeout

    def _metadata(self, extra: _Metadata) -> _Metadata:
        """The client's own metadata (the token) plus a call's (e.g. a W3C ``traceparent``)."""
        return (*self.metadata, *extra) if extra else self.metadata


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


_Call = TypeVar("_Call", bound=_Cancellable)
_REISSUE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)  # the replica died or shut down
_MIN_REISSUE_S = 0.01


class _Stream(Generic[_Call]):
    """One Recommend call as the caller sees it, possibly over several gRPC calls: a stream cut by UNAVAILABLE or
    CANCELLED (its replica died or shut down; never after :meth:`cancel`) where gRPC's own retries no longer
    apply (bundles had arrived) is re-issued within the same deadline, at most ``reissue`` times. Bundles the
    caller already has are never yielded again: the new stream must repeat them exactly (same ranks and items)
    and they are skipped, or the original error is raised."""

    def __init__(self, start: Callable[[float], _Call], timeout: float, reissue: int) -> None:
        self._start = start
        self._deadline = time.monotonic() + timeout
        self._reissues_left = reissue
        self.reissued = 0  # gRPC calls re-issued by the client (retries inside gRPC are not counted here)
        self.skipped = 0  # bundles a re-issued call repeated, checked against what the caller has, not yielded
        self._call = start(timeout)
        self._given: list[tuple[int, tuple[str, ...]]] = []  # what the caller already has: (rank, item ids)
        self._replay = 0  # bundles of the current call still to be matched against _given and skipped
        self._cancelled = False
        self._cut: grpc.RpcError  # the error that cut the call, once it was re-issued
        self.summary: pb.StreamSummary | None = None

    def _bundle(self, msg: pb.RecommendResponse) -> pb.Bundle | None:
        """The bundle of a message to yield; None for the final summary (which it records) and for the repeated
        bundles of a re-issued call. ``_Diverged`` if a re-issued call does not repeat what the caller has."""
        if not msg.HasField("bundle"):
            if self._replay:  # the re-issued call ended before repeating all the caller has
                raise _Diverged(self._cut)
            self.summary = msg.summary
            return None
        key = (msg.bundle.rank, tuple(item.item_id for item in msg.bundle.items))
        if self._replay:
            if key != self._given[len(self._given) - self._replay]:
                raise _Diverged(self._cut)
            self._replay -= 1
            self.skipped += 1
            return None
        self._given.append(key)
        return msg.bundle

    def _failed(self, exc: grpc.RpcError | _Diverged) -> None:
        """The current call failed: starts it again if the error allows (see the class), or raises the
        caller's BundleRecError (the first error, if the re-issued call diverged)."""
        if isinstance(exc, _Diverged):
            self._call.cancel()
            raise from_rpc_error(exc.cut) from None
        left = self._deadline - time.monotonic()
        code = exc.code() if hasattr(exc, "code") else None
        if code not in _REISSUE_CODES or self._cancelled or self._reissues_left <= 0 or left < _MIN_REISSUE_S:
            raise from_rpc_error(exc) from None
        self._cut = exc
        self._reissues_left -= 1
        self.reissued += 1
        self._replay = len(self._given)
        self._call = self._start(left)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class _Diverged(Exception):
    """A re-issued Recommend call answered differently from the cut one (new artifact, new history)."""

    def __init__(self, cut: grpc.RpcError) -> None:
        super().__init__()
        self.cut = cut


if TYPE_CHECKING:  # grpc._CallIterator exists in the type stubs only
    _SyncCall = grpc._CallIterator[pb.RecommendResponse]
    _AsyncCall = grpc.aio.UnaryStreamCall[pb.RecommendRequest, pb.RecommendResponse]


class RecommendStream(_Stream["_SyncCall"]):
    """Iterator over the bundles of one Recommend call; :attr:`summary` is set once the stream has ended."""

    def __iter__(self) -> Iterator[pb.Bundle]:
        while True:
            try:
                for msg in self._call:
                    if (bundle := self._bundle(msg)) is not None:
                        yield bundle
                return
            except (grpc.RpcError, _Diverged) as exc:
                self._failed(exc)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The server's trailers (e.g. ``bundlerec-replica``) once the stream has ended."""
        return tuple(self._call.trailing_metadata() or ())


class AsyncRecommendStream(_Stream["_AsyncCall"]):
    """Async iterator over the bundles of one Recommend call; :attr:`summary` is set once it has ended."""

    async def __aiter__(self) -> AsyncIterator[pb.Bundle]:
        while True:
            try:
                async for msg in self._call:
                    if (bundle := self._bundle(msg)) is not None:
                        yield bundle
                return
            except (grpc.RpcError, _Diverged) as exc:
                self._failed(exc)

    async def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(await self._call.trailing_metadata() or ())


class Client(_Base):
    """Blocking client: a context manager over one channel to one server or several replicas.

    ``target``: ``host:port``, a list of ``ip:port`` replicas, or ``dns:///name:port``. Deadlines: a call's own
    ``timeout``, else the client's ``timeout`` (every method), else ``timeouts[method]`` (defaults in
    :data:`DEFAULT_TIMEOUTS`); the service config caps each method at that value. ``retry``: gRPC's retry policy
    (None: no retries). ``reissue``: how often a Recommend stream cut by a dying replica is started again."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = None, tls: TLS | None = None,
                 token: str | None = None, timeouts: Mapping[str, float] | None = None,
                 retry: RetryPolicy | None = RetryPolicy(), reissue: int = 1) -> None:
        super().__init__(target, timeout, tls, token, timeouts, retry, reissue)
        options = channel_options(self.service_config)
        if tls is None:
            self.channel = grpc.insecure_channel(self.target, options=options)
        else:
            self.channel = grpc.secure_channel(self.target, tls.credentials(), options=options)
        self.stub: _SyncStub = _stub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method: Callable[..., _Resp], request: _Req | Iterator[_Req], timeout: float | None,
               metadata: _Metadata = ()) -> _Resp:
        try:
            return method(request, timeout=timeout, metadata=self._metadata(metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def recommend(self, query: str, *, timeout: float | None = None, metadata: _Metadata = (), **kwargs: Any) -> RecommendStream:
        """Starts a Recommend call; iterate the result for bundles (keyword args: see :func:`recommend_request`;
        ``metadata``: extra gRPC metadata for this call, e.g. ``(("traceparent", ...),)``)."""
        request = recommend_request(query, **kwargs)
        md = self._metadata(metadata)
        return RecommendStream(lambda left: self.stub.Recommend(request, timeout=left, metadata=md),
                               self._timeout("Recommend", timeout), self.reissue)

    def search(self, query: str, k: int = 10, *, retrieval_mode: str | None = None, rerank: bool | None = None,
               timeout: float | None = None, metadata: _Metadata = (), **filter_args: Any) -> list[pb.SearchHit]:
        request = search_request(query, k, retrieval_mode, rerank, **filter_args)
        return list(self._unary(self.stub.Search, request, self._timeout("Search", timeout), metadata).hits)

    def info(self, *, timeout: float | None = None, metadata: _Metadata = ()) -> pb.GetInfoResponse:
        return self._unary(self.stub.GetInfo, pb.GetInfoRequest(), self._timeout("GetInfo", timeout), metadata)

    def record_events(self, events: Iterable[pb.Event], *, timeout: float | None = None,
                      metadata: _Metadata = ()) -> pb.RecordEventsResponse:
        return self._unary(self.stub.RecordEvents, iter(events), self._timeout("RecordEvents", timeout), metadata)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ... (health stubs ship with grpcio-health-checking)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), self._timeout("GetInfo", timeout))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


class AsyncClient(_Base):
    """grpc.aio client with the same arguments and methods as :class:`Client`, as coroutines / async iterators."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = None, tls: TLS | None = None,
                 token: str | None = None, timeouts: Mapping[str, float] | None = None,
                 retry: RetryPolicy | None = RetryPolicy(), reissue: int = 1) -> None:
        super().__init__(target, timeout, tls, token, timeouts, retry, reissue)
        options = channel_options(self.service_config)
        if tls is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(self.target, tls.credentials(), options=options)
        self.stub: _AsyncStub = _stub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method: Callable[..., Awaitable[_Resp]], request: _Req | Iterator[_Req], timeout: float | None,
                     metadata: _Metadata = ()) -> _Resp:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata(metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def recommend(self, query: str, *, timeout: float | None = None, metadata: _Metadata = (), **kwargs: Any) -> AsyncRecommendStream:
        request = recommend_request(query, **kwargs)
        md = self._metadata(metadata)
        return AsyncRecommendStream(lambda left: self.stub.Recommend(request, timeout=left, metadata=md),
                                    self._timeout("Recommend", timeout), self.reissue)

    async def search(self, query: str, k: int = 10, *, retrieval_mode: str | None = None, rerank: bool | None = None,
                     timeout: float | None = None, metadata: _Metadata = (), **filter_args: Any) -> list[pb.SearchHit]:
        request = search_request(query, k, retrieval_mode, rerank, **filter_args)
        return list((await self._unary(self.stub.Search, request, self._timeout("Search", timeout), metadata)).hits)

    async def info(self, *, timeout: float | None = None, metadata: _Metadata = ()) -> pb.GetInfoResponse:
        return await self._unary(self.stub.GetInfo, pb.GetInfoRequest(), self._timeout("GetInfo", timeout), metadata)

    async def record_events(self, events: Iterable[pb.Event], *, timeout: float | None = None,
                            metadata: _Metadata = ()) -> pb.RecordEventsResponse:
        return await self._unary(self.stub.RecordEvents, iter(events), self._timeout("RecordEvents", timeout), metadata)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), self._timeout("GetInfo", timeout))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


__all__ = ["Client", "AsyncClient", "RecommendStream", "AsyncRecommendStream", "TLS", "BundleRecError", "RetryPolicy",
           "DEFAULT_TIMEOUTS", "recommend_request", "search_request", "resolve_target", "service_config"]
