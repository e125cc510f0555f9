"""Domain exceptions, and the one place where they become gRPC statuses with google.rpc details."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class BundleRecError(Exception):
    """Base of the errors the service reports to callers with a specific status. ``retry_after_s`` (set on the
    retryable ones) becomes a google.rpc.RetryInfo detail and the ``grpc-retry-pushback-ms`` trailer."""

    code = grpc.StatusCode.INTERNAL
    retry_after_s: float | None = None

    def details(self) -> list[any_pb2.Any]:
        return [] if self.retry_after_s is None else [retry_info(self.retry_after_s)]


class InvalidRequest(BundleRecError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))

    def details(self) -> list[any_pb2.Any]:
        req = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(req)
        return [detail]


class NotFound(BundleRecError):
    code = grpc.StatusCode.NOT_FOUND


class Unsupported(BundleRecError):
    """The request asks for something this artifact cannot do (e.g. lexical retrieval without an index)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(BundleRecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 0.05) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class NotReady(BundleRecError):
    """Not serving yet (loading) or a dependency is down: UNAVAILABLE, which clients retry (on another replica)."""

    code = grpc.StatusCode.UNAVAILABLE
    retry_after_s: float | None = 0.1


class OutOfTime(BundleRecError):
    """The call's deadline (minus the margin) arrived before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str = "deadline reached before retrieval finished") -> None:
        super().__init__(message)


# gRPC's client-side retry honours this trailer (milliseconds to wait before the next attempt), not RetryInfo
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_info(retry_after_s: float) -> any_pb2.Any:
    secs = int(retry_after_s)
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=secs, nanos=int((retry_after_s - secs) * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(info)
    return detail


def to_status(exc: BundleRecError) -> grpc.Status:
    """The status with google.rpc details; a retryable error also carries ``grpc-retry-pushback-ms``."""
    status = status_pb2.Status(code=getattr(code_pb2, exc.code.name), message=str(exc), details=exc.details())
    out: grpc.Status = rpc_status.to_status(status)
    if exc.retry_after_s is not None:
        pushback = ((PUSHBACK_KEY, str(max(0, round(exc.retry_after_s * 1000)))),)
        out = _Status(out.code, out.details, tuple(out.trailing_metadata) + pushback)
    return out


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status a call ending with ``exc`` gets: the error's own for a BundleRecError, otherwise INTERNAL."""
    return exc.code if isinstance(exc, BundleRecError) else grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """Ends the call with the status that ``exc`` maps to; always raises. Unexpected exceptions are bugs:
    INTERNAL, logged."""
    if isinstance(exc, BundleRecError):
        await context.abort_with_status(to_status(exc))
    else:
        logger.exception("unexpected error while serving a call", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise RuntimeError("ServicerContext.abort returned instead of raising")  # grpc's abort always raises
