"""OpenTelemetry tracing (``--tracing off|console|otlp``; off by default).

One server span per RPC (kind SERVER, its parent taken from the call's W3C ``traceparent``/``tracestate``
metadata) and child spans for the steps of a call: ``admission``, ``history``, ``encode``, ``retrieve``,
``bundle``, ``stream``. Off, every helper here returns a shared no-op object: no span is created, no
OpenTelemetry code runs, and OpenTelemetry is not even imported.

A span is made current (the parent of spans started inside it) only for a block that does not yield: gRPC
closes a stream its caller cancelled later, from another task, where a context attached across a yield can
no longer be detached. A streaming call's server span is current while each message is produced
(:func:`steps`); a block that yields gets a span that is not current (:func:`open_span`).

The tracer comes from this module's own ``TracerProvider`` (never the process-global one), so tests can
install an in-memory exporter with :func:`enable` and remove it with :func:`disable`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from .settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC status codes that make a server span an error (OpenTelemetry semantic conventions for RPC servers)
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


class _NoSpan:
    """What every helper hands out while tracing is off: records nothing."""

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass


NO_SPAN = _NoSpan()
_NO_SPAN_CM: contextlib.nullcontext[Any] = contextlib.nullcontext(NO_SPAN)  # reusable: entering it does nothing

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one, made current for the ``with`` block (off: a shared no-op)."""
    if _tracer is None:
        return _NO_SPAN_CM
    return _tracer.start_as_current_span(name)


def record(name: str, start_ns: int) -> None:
    """A child span of the current one that began at ``start_ns`` (``time.time_ns()``) and ends now: a step that
    began on the event loop and ended in a worker (the encode of a call whose retrieval follows in that worker)."""
    if _tracer is not None:
        _tracer.start_span(name, start_time=start_ns).end()


def server_span(service: str, method: str, context: Any) -> Any:
    """The span of one RPC (started, not current: see :func:`current` and :func:`steps`), child of the caller's
    ``traceparent`` when the call's invocation metadata carries one; ``context`` is the servicer context, read
    only when tracing is on. End it with :func:`finish`."""
    if _tracer is None:
        return NO_SPAN
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}  # -bin values: no trace
    return _tracer.start_span(
        f"{service}/{method}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
    )


def finish(s: Any, code: str) -> None:
    """Ends a server span: ``rpc.grpc.status_code`` (the number of the call's final status code, by name) and,
    for server-side failures, span status ERROR."""
    if s is NO_SPAN:
        return
    import grpc
    from opentelemetry.trace import Status, StatusCode

    s.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    if code in SERVER_ERRORS:
        s.set_status(Status(StatusCode.ERROR, code))
    s.end()


def current(s: Any) -> contextlib.AbstractContextManager[Any]:
    """Makes ``s`` the current span for a block that does not yield (a unary handler)."""
    if s is NO_SPAN:
        return _NO_SPAN_CM
    from opentelemetry.trace import use_span

    return use_span(s, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def steps(s: Any, messages: AsyncIterator[T]) -> AsyncIterator[T]:
    """``messages`` (a streaming handler), with ``s`` current while each message is being produced, and not
    across the yields: a stream the caller cancels is closed later from another context, where a context
    attached across a yield could not be detached."""
    if s is NO_SPAN:
        return messages
    return _Steps(s, messages)


class _Steps(AsyncIterator[T]):
    def __init__(self, s: Span, messages: AsyncIterator[T]) -> None:
        from opentelemetry.trace import set_span_in_context

        self.ctx, self.messages = set_span_in_context(s), messages

    async def __anext__(self) -> T:
        from opentelemetry import context

        token = context.attach(self.ctx)
        try:
            return await self.messages.__anext__()
        finally:
            context.detach(token)


def open_span(name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one that is not made current: for a block of a streaming handler that
    yields (see :func:`steps`)."""
    if _tracer is None:
        return _NO_SPAN_CM
    return _open_span(_tracer, name)


@contextlib.contextmanager
def _open_span(tracer: Tracer, name: str) -> Iterator[Span]:
    s = tracer.start_span(name)
    try:
        yield s
    except Exception as exc:
        from opentelemetry.trace import Status, StatusCode

        s.record_exception(exc)
        s.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        s.end()


class _EnteredInSpan:
    """An async context manager whose entry (e.g. waiting for an admission slot) is timed as its own span."""

    def __init__(self, name: str, cm: contextlib.AbstractAsyncContextManager[Any]) -> None:
        self.name, self.cm = name, cm

    async def __aenter__(self) -> Any:
        with span(self.name):
            return await self.cm.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        return await self.cm.__aexit__(exc_type, exc, tb)


def entering(name: str, cm: contextlib.AbstractAsyncContextManager[Any]) -> contextlib.AbstractAsyncContextManager[Any]:
    """``cm`` itself when tracing is off; else ``cm`` with the wait to enter it recorded as span ``name``."""
    if _tracer is None:
        return cm
    return _EnteredInSpan(name, cm)


# --- setup -----------------------------------------------------------------------------------------------


def exporters_for(mode: str) -> Sequence[SpanExporter]:
    """The exporter for a ``--tracing`` mode: console (JSON lines on stdout) or OTLP over gRPC (endpoint,
    headers and TLS from the standard ``OTEL_EXPORTER_OTLP_*`` variables; default localhost:4317)."""
    if mode == "console":
        import sys

        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return [ConsoleSpanExporter(out=sys.stdout)]  # the stdout of now, not of when OpenTelemetry was imported
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return [OTLPSpanExporter()]
    return []


def configure(settings: Settings) -> bool:
    """Turns tracing on as ``settings.tracing`` says (batched export); False when it stays off."""
    if settings.tracing == "off":
        return False
    enable(*exporters_for(settings.tracing), service_name=settings.tracing_service_name, batch=True)
    logger.info("tracing on: %s exporter, service.name %s", settings.tracing, settings.tracing_service_name)
    return True


def enable(*exporters: SpanExporter, service_name: str = "bundlerec", batch: bool = False) -> TracerProvider:
    """Installs a tracer provider exporting to ``exporters`` (``batch``: in the background; else as each span
    ends, as tests want). Sampling follows ``OTEL_TRACES_SAMPLER`` (default: parent-based, always on)."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from . import __version__

    disable()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name, "service.version": __version__}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _provider, _tracer = provider, provider.get_tracer("bundlerec_server", __version__)
    return provider


def disable() -> None:
    """Back to off; spans not yet exported are flushed first."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()
