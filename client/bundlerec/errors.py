"""The client's own exception type: callers never see a raw grpc.RpcError."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import grpc


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class BundleRecError(Exception):
    """A failed call. ``code`` is the gRPC status code; ``field_violations`` is filled for INVALID_ARGUMENT
    and ``retry_after_s`` for RESOURCE_EXHAUSTED when the server sent google.rpc details (decoded only if
    googleapis-common-protos is installed; the message always carries the gist)."""

    code: grpc.StatusCode
    message: str
    field_violations: list[FieldViolation] = field(default_factory=list)
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def from_rpc_error(err: grpc.RpcError) -> BundleRecError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    exc = BundleRecError(code, message or "")
    # sync calls give (key, value) namedtuples, grpc.aio calls a grpc.aio.Metadata: both iterate as pairs
    trailers = cast("Iterable[tuple[str, str | bytes]] | None", err.trailing_metadata() if hasattr(err, "trailing_metadata") else None)
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            _decode_details(value, exc)
    return exc


def _decode_details(blob: bytes, exc: BundleRecError) -> None:
    try:  # optional dependency: keep the client installable with grpcio + protobuf only
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:
        return
    status = status_pb2.Status.FromString(blob)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            req = error_details_pb2.BadRequest()
            detail.Unpack(req)
            exc.field_violations.extend(FieldViolation(v.field, v.description) for v in req.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            exc.retry_after_s = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
