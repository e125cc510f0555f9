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
    """Base of the errors the service reports to callers with a specific status."""

    code = grpc.StatusCode.INTERNAL

    def details(self) -> list[any_pb2.Any]:
        return []


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

    def details(self) -> list[any_pb2.Any]:
        secs = int(self.retry_after_s)
        info = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=secs, nanos=int((self.retry_after_s - secs) * 1e9))
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return [detail]


class NotReady(BundleRecError):
    code = grpc.StatusCode.UNAVAILABLE


class OutOfTime(BundleRecError):
    """The call's deadline (minus the margin) arrived before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str = "deadline reached before retrieval finished") -> None:
        super().__init__(message)


def to_status(exc: BundleRecError) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, exc.code.name), message=str(exc), details=exc.details())
    out: grpc.Status = rpc_status.to_status(status)
    return out


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
