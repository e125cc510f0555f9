"""The gRPC servicer: protobuf <-> domain and nothing else. Every RPC runs under :func:`observed`, which
turns exceptions into statuses and counts and times the call; the work happens in Engine/Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc

from . import __version__, convert, metrics, tracing
from .domain import History, Hit, Mode, Personalization, RecommendQuery, RerankOutcome, SearchQuery, Stop
from .errors import InvalidRequest, OutOfTime, Unsupported, Violation, abort_with, status_code
from .events import EventRecord
from .runtime import Runtime, Serving
from .security import fingerprint
from .streaming import Paced

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BundleRecommender"].full_name
H = TypeVar("H", bound=Callable[..., Any])


class _Observed:
    """Counts a call by method and final status code and records its latency (Prometheus); with tracing on,
    it also holds the call's server span (child of the caller's ``traceparent``), ended with the final code."""

    def __init__(self, method: str, context: Context) -> None:
        self.method, self.code, self.t0 = method, "OK", time.perf_counter()
        self.span = tracing.server_span(SERVICE_NAME, method, context)

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None and issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            self.code = "CANCELLED"  # GeneratorExit: a stream closed before its end, as gRPC does when cancelled
        metrics.REQUESTS.labels(self.method, self.code).inc()
        metrics.LATENCY.labels(self.method).observe(time.perf_counter() - self.t0)
        tracing.finish(self.span, self.code)

    async def fail(self, context: Context, exc: Exception) -> NoReturn:
        if isinstance(exc, grpc.aio.AbortError):  # handlers raise rather than abort; never counted as OK
            self.code = "UNKNOWN"
            raise exc
        self.code = status_code(exc).name
        await abort_with(context, exc)


REPLICA_KEY = "bundlerec-replica"
ATTEMPTS_KEY = "grpc-previous-rpc-attempts"  # sent by gRPC clients on a retry attempt


def _tag_replica(servicer: Any, context: Context) -> None:
    """With ``--replica-id``: names the replica in the call's trailers (which one served a call behind a
    balancer) and echoes how many earlier attempts gRPC made (``bundlerec-previous-attempts``: retries seen)."""
    replica = getattr(getattr(servicer, "settings", None), "replica_id", "")
    if replica:
        trailers = [(REPLICA_KEY, replica)]
        trailers += [("bundlerec-previous-attempts", str(v)) for k, v in context.invocation_metadata() or () if k == ATTEMPTS_KEY]
        context.set_trailing_metadata(tuple(trailers))


def observed(handler: H) -> H:
    """Runs an RPC handler (unary or server-streaming) the one way: an exception it raises ends the call with
    its status (:func:`~bundlerec_server.errors.abort_with`; handlers raise, they do not abort), and the call is
    counted by method and final code and timed."""
    method = handler.__name__

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def streaming(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
            _tag_replica(self, context)
            with _Observed(method, context) as call:
                try:
                    async with contextlib.aclosing(handler(self, request, context)) as messages:
                        async for message in tracing.steps(call.span, messages):  # closed with the call: its admission slot goes at once
                            yield message
                except Exception as exc:
                    await call.fail(context, exc)

        return streaming  # type: ignore[return-value]  # same signature as the handler, wrapped

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        _tag_replica(self, context)
        with _Observed(method, context) as call:
            try:
                with tracing.current(call.span):
                    response = await handler(self, request, context)
            except Exception as exc:
                await call.fail(context, exc)
            else:
                return response

    return unary  # type: ignore[return-value]  # same signature as the handler, wrapped


async def _enumerate(items: AsyncIterable[Any]) -> AsyncIterator[tuple[int, Any]]:
    i = 0
    async for x in items:
        yield i, x
        i += 1


TimeLeft = Callable[[], float | None]


class BundleRecommenderServicer(pb_grpc.BundleRecommenderServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings

    async def _bundles(self, serving: Serving, q: RecommendQuery, time_left: TimeLeft
                       ) -> tuple[Sequence[pb.RecommendResponse], Personalization, Stop | None, RerankOutcome]:
        """The call's bundle messages, best first, and how the query was personalised; Stop.DEADLINE (no bundles)
        when the deadline comes first. A request nothing personalises may find its messages in the reply cache
        (or being computed by another call)."""
        engine = serving.engine
        rerank = engine.wants_rerank(q.rerank, recommend=True)
        mode = engine.mode_for(q.mode)
        replies = serving.replies
        key = replies.key(q, mode, rerank) if replies is not None else None

        async def compute() -> list[pb.RecommendResponse]:
            return (await self._computed(serving, q, mode, rerank, time_left))[0]

        try:
            if key is None:
                messages, info, outcome = await self._computed(serving, q, mode, rerank, time_left)
            else:  # nothing personalises or re-ranks it: the messages are the whole reply
                messages, info, outcome = await self.rt.cached(replies, key, compute, time_left), Personalization(), RerankOutcome.NOT_USED
        except OutOfTime:
            return [], Personalization(), Stop.DEADLINE, RerankOutcome.NOT_USED
        return messages, info, None, outcome

    async def _computed(self, serving: Serving, q: RecommendQuery, mode: Mode, rerank: bool, time_left: TimeLeft
                        ) -> tuple[list[pb.RecommendResponse], Personalization, RerankOutcome]:
        """Without re-ranking, the encode worker retrieves, bundles and builds the messages right after its encode
        (one hop); with it, the anchors go through the cross-encoder stage first. OutOfTime when the deadline
        comes before the messages."""
        engine = serving.engine
        history = History()
        if q.user_id and self.rt.events is not None:
            with tracing.span("history"):
                history = await self.rt.events.history(q.user_id)
        encoded = engine.needs_vector(mode)
        began = time.time_ns()
        request_ids = (*q.recent_item_ids, *(c.item_id for c in q.recent_item_counts))
        allowed = engine.allow(q.filters)

        def messages(anchors: list[Hit]) -> list[pb.RecommendResponse]:
            bundles = engine.bundle(q, anchors, allowed, history)
            return [convert.bundle_message(b, rank, engine.catalog) for rank, b in enumerate(bundles, start=1)]

        def work(vec: np.ndarray | None) -> tuple[list[Any], Personalization]:  # in a worker
            info = Personalization()
            if vec is not None:
                tracing.record("encode", began)
                vec, info = engine.personalize(vec, request_ids, history.recent)
            anchors = engine.anchors(q, vec, allowed)
            return (anchors if rerank else messages(anchors)), info

        out, info = await self.rt.call(serving, q.query if encoded else None, work, time_left)
        if not rerank:
            return out, info, RerankOutcome.NOT_USED
        with tracing.span("rerank"):
            anchors, outcome = await self.rt.rerank(serving, q.query, out, time_left)
        return messages(anchors), info, outcome

    @observed
    async def Recommend(self, request: pb.RecommendRequest, context: Context) -> AsyncIterator[pb.RecommendResponse]:
        t0 = time.perf_counter()
        time_left: TimeLeft = context.time_remaining
        q = convert.recommend_query(request, self.settings)
        serving = self.rt.serving()
        engine = serving.engine
        # the slot is taken before tokenising (shedding is cheap) and held until the summary is sent
        async with tracing.entering("admission", self.rt.admission.slot()):
            engine.check_tokens(q.query)
            messages, info, stop, rerank = await self._bundles(serving, q, time_left)
            paced = Paced(messages, time_left, self.settings.deadline_margin_ms / 1000.0)
            with tracing.open_span("stream") as span:  # not current: the block yields
                for message in paced:
                    if paced.sent == 1:
                        metrics.FIRST_BUNDLE.observe(time.perf_counter() - t0)
                    yield message
                stop = stop or paced.stop
                assert stop is not None  # Paced says why it ended once its iteration is over
                span.set_attribute("bundlerec.bundles_sent", paced.sent)
                span.set_attribute("bundlerec.stop_reason", stop.value)
            metrics.STOPS.labels(stop.value).inc()
            if logger.isEnabledFor(logging.DEBUG):  # fingerprints only: raw queries and user ids never reach logs
                logger.debug("recommend q=%s user=%s bundles=%d stop=%s %.1f ms", fingerprint(q.query),
                             fingerprint(q.user_id) if q.user_id else "-", paced.sent, stop.value, (time.perf_counter() - t0) * 1000)
            yield pb.RecommendResponse(
                summary=pb.StreamSummary(
                    bundles_sent=paced.sent,
                    stop_reason=convert.STOP_TO_PB[stop],
                    artifact_version=engine.version,
                    personalized=info.applied,
                    unknown_item_ids=info.unknown_ids,
                    server_ms=(time.perf_counter() - t0) * 1000.0,
                    rerank=convert.RERANK_TO_PB[rerank],
                )
            )

    @observed
    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        q = convert.search_query(request, self.settings)
        serving = self.rt.serving()
        engine = serving.engine
        async with tracing.entering("admission", self.rt.admission.slot()):
            engine.check_tokens(q.query)
            rerank = engine.wants_rerank(q.rerank)
            mode = engine.mode_for(q.mode)
            searches = serving.searches
            key = searches.key(q, mode, rerank) if searches is not None else None
            compute = functools.partial(self._search, serving, q, mode, rerank, context.time_remaining)
            response: pb.SearchResponse = await self.rt.cached(searches, key, compute, context.time_remaining)
        return response

    async def _search(self, serving: Serving, q: SearchQuery, mode: Mode, rerank: bool, time_left: TimeLeft
                      ) -> pb.SearchResponse:
        """Without re-ranking, the encode worker retrieves and builds the reply right after its encode (one hop);
        with it, the hits go through the cross-encoder stage first."""
        engine = serving.engine
        depth = engine.reranker.depth if rerank and engine.reranker else 0
        began = time.time_ns()

        def reply(hits: list[Hit], outcome: RerankOutcome) -> pb.SearchResponse:
            return pb.SearchResponse(hits=[convert.search_hit(h, engine.catalog) for h in hits[: q.k]],
                                     artifact_version=engine.version, rerank=convert.RERANK_TO_PB[outcome])

        def work(vec: np.ndarray | None) -> Any:  # in a worker, right after the encode
            if vec is not None:
                tracing.record("encode", began)
            with tracing.span("retrieve"):
                hits = engine.search(q, vec, depth)
            return hits if rerank else reply(hits, RerankOutcome.NOT_USED)  # the reply built here: one hop

        out = await self.rt.call(serving, q.query if engine.needs_vector(mode) else None, work, time_left)
        if not rerank:
            response: pb.SearchResponse = out
            return response
        with tracing.span("rerank"):
            hits, outcome = await self.rt.rerank(serving, q.query, out, time_left)
        return reply(hits, outcome)

    @observed
    async def RecordEvents(self, request_iterator: AsyncIterable[pb.Event], context: Context) -> pb.RecordEventsResponse:
        """Validates the whole stream, stores it in one durable transaction, then acknowledges."""
        store = self.rt.events
        if store is None:
            raise Unsupported("events are not enabled on this server (start it with --events-db)")
        engine = self.rt.engine()
        now_ms = int(time.time() * 1000)
        records: list[EventRecord] = []
        unknown = 0
        async for index, ev in _enumerate(request_iterator):
            if index >= self.settings.max_events_per_call:
                raise InvalidRequest([Violation("events", f"more than {self.settings.max_events_per_call} events in one call")])
            record = convert.event_record(ev, index, now_ms)
            if record.item_id in engine.catalog.row_of:
                records.append(record)
            else:
                unknown += 1
        await store.append(records)
        metrics.EVENTS.inc(len(records))
        logger.debug("stored %d events (%d unknown items)", len(records), unknown)
        return pb.RecordEventsResponse(accepted=len(records), unknown_items=unknown)

    @observed
    async def GetInfo(self, request: pb.GetInfoRequest, context: Context) -> pb.GetInfoResponse:
        info = self.rt.engine().info()
        created = timestamp_pb2.Timestamp()
        if info["created_at"]:
            created.FromJsonString(info["created_at"])
        return pb.GetInfoResponse(
            artifact_version=info["artifact_version"], model_variant=info["model_variant"],
            execution_provider=info["execution_provider"], item_count=info["item_count"],
            dataset=info["dataset"], embedding_dim=info["embedding_dim"], artifact_created_at=created,
            retrieval_modes=[convert.MODE_TO_PB[m] for m in info["modes"]],
            default_retrieval_mode=convert.MODE_TO_PB[info["default_mode"]], server_version=__version__,
        )

