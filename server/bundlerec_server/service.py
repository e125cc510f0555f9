"""The gRPC servicer: translates protobuf <-> domain and maps errors; the work happens in Engine/Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from google.protobuf import timestamp_pb2

from bundlerec.v1 import bundlerec_pb2 as pb
from bundlerec.v1 import bundlerec_pb2_grpc as pb_grpc

from . import __version__, convert, metrics
from .domain import Personalization, Stop
from .errors import BundleRecError, InvalidRequest, Unsupported, Violation, abort_with
from .runtime import OutOfTime, Runtime
from .security import fingerprint
from .streaming import Paced

logger = logging.getLogger(__name__)


async def _enumerate(aiter):
    i = 0
    async for x in aiter:
        yield i, x
        i += 1


def _time_left(context: grpc.aio.ServicerContext):
    return context.time_remaining


class _Observed:
    """Counts a call by method and final status code and records its latency (Prometheus)."""

    def __init__(self, method: str) -> None:
        self.method, self.code, self.t0 = method, "OK", time.perf_counter()

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self.code = "CANCELLED"
        metrics.REQUESTS.labels(self.method, self.code).inc()
        metrics.LATENCY.labels(self.method).observe(time.perf_counter() - self.t0)

    async def abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        self.code = exc.code.name if isinstance(exc, BundleRecError) else "INTERNAL"
        await abort_with(context, exc)


class BundleRecommenderServicer(pb_grpc.BundleRecommenderServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.settings = runtime.settings

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext):
        with _Observed("Recommend") as call:
            async for msg in self._recommend(request, context, call):
                yield msg

    async def _recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext, call: _Observed):
        t0 = call.t0
        time_left = _time_left(context)
        bundles, info, stop = [], Personalization(), None
        async with contextlib.AsyncExitStack() as held:  # the slot is held until the summary is handed to gRPC
            try:
                q = convert.recommend_query(request, self.settings)
                engine = self.rt.engine()
                await held.enter_async_context(self.rt.admission.slot())  # before tokenising: shedding is cheap
                engine.check_tokens(q.query)
                from_events = []
                if q.user_id and self.rt.events is not None:
                    from_events = await self.rt.events.recent_items(q.user_id)
                try:
                    vec = None
                    if engine.needs_vector(engine.mode_for(q.mode)):
                        vec = await self.rt.encode(engine, q.query, time_left)
                        vec, info = engine.personalize(vec, q.recent_item_ids, from_events)
                    bundles = engine.recommend(q, vec)
                except OutOfTime:
                    stop = Stop.DEADLINE
            except Exception as exc:  # BundleRecError -> its status; anything else is a bug: INTERNAL, logged
                await call.abort(context, exc)
            paced = Paced(bundles, time_left, self.settings.deadline_margin_ms / 1000.0)
            for rank, bundle in enumerate(paced, start=1):
                if rank == 1:
                    metrics.FIRST_BUNDLE.observe(time.perf_counter() - t0)
                yield convert.bundle_message(bundle, rank, engine.catalog)
            stop = stop or paced.stop
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
                )
            )

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        with _Observed("Search") as call:
            return await self._search(request, context, call)

    async def _search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext, call: _Observed) -> pb.SearchResponse:
        try:
            q = convert.search_query(request, self.settings)
            engine = self.rt.engine()
            async with self.rt.admission.slot():
                engine.check_tokens(q.query)
                vec = None
                if engine.needs_vector(engine.mode_for(q.mode)):
                    vec = await self.rt.encode(engine, q.query, _time_left(context))
                hits = engine.search(q, vec)
        except OutOfTime:
            call.code = "DEADLINE_EXCEEDED"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline reached before retrieval finished")
        except Exception as exc:
            await call.abort(context, exc)
        return pb.SearchResponse(hits=[convert.search_hit(h, engine.catalog) for h in hits], artifact_version=engine.version)

    async def RecordEvents(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.RecordEventsResponse:
        with _Observed("RecordEvents") as call:
            return await self._record_events(request_iterator, context, call)

    async def _record_events(self, request_iterator, context: grpc.aio.ServicerContext, call: _Observed) -> pb.RecordEventsResponse:
        """Validates the whole stream, stores it in one durable transaction, then acknowledges."""
        try:
            store = self.rt.events
            if store is None:
                raise Unsupported("events are not enabled on this server (start it with --events-db)")
            engine = self.rt.engine()
            now_ms = int(time.time() * 1000)
            records, unknown = [], 0
            index = -1
            async for index, ev in _enumerate(request_iterator):
                if index >= self.settings.max_events_per_call:
                    raise InvalidRequest([Violation("events", f"more than {self.settings.max_events_per_call} events in one call")])
                record = convert.event_record(ev, index, now_ms)
                if record.item_id in engine.catalog.row_of:
                    records.append(record)
                else:
                    unknown += 1
            await self.rt.events.append(records)
            metrics.EVENTS.inc(len(records))
        except Exception as exc:
            await call.abort(context, exc)
        logger.debug("stored %d events (%d unknown items)", len(records), unknown)
        return pb.RecordEventsResponse(accepted=len(records), unknown_items=unknown)

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetInfoResponse:
        try:
            info = self.rt.engine().info()
        except Exception as exc:
            await _Observed("GetInfo").abort(context, exc)
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
