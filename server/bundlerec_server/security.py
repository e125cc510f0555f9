"""Transport security and caller authentication.

* TLS (``--tls-cert/--tls-key``) and mutual TLS (``--tls-client-ca``: a client certificate signed by that
  CA is required; the TLS handshake refuses anyone else).
* Bearer tokens (``--auth-token-file`` or ``BUNDLEREC_AUTH_TOKEN``): every call must carry
  ``authorization: Bearer <token>``; compared in constant time (:func:`hmac.compare_digest`); otherwise
  UNAUTHENTICATED. Policy: ``grpc.health.v1.Health`` is exempt so load balancers and orchestrators can
  probe without credentials (it reveals only SERVING/NOT_SERVING); server reflection and every
  bundlerec RPC require the token.
* :func:`fingerprint`: logs name queries and user ids by a short keyed-free hash, never raw, at INFO+.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from .settings import Settings

logger = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def fingerprint(text: str) -> str:
    """A short, stable hash standing in for a raw query or user id in logs."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    if not settings.tls_key:
        raise ValueError("tls_cert needs tls_key")
    pairs = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    if settings.tls_client_ca:
        return grpc.ssl_server_credentials(
            pairs, root_certificates=settings.tls_client_ca.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pairs)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _refusal(handler: Handler, message: str) -> Handler:
    async def refuse_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty bearer token")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]], details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
                break
        if hmac.compare_digest(given.encode("utf-8", "replace"), self._expected):
            return handler
        logger.warning("refused %s: %s bearer token", details.method, "wrong" if given else "no")
        return _refusal(handler, "a valid bearer token is required (authorization: Bearer <token>)")
