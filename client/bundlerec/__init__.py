"""bundlerec client: typed sync/async access to the bundlerec gRPC service (grpcio + protobuf only)."""

from .client import (
    TLS,
    AsyncClient,
    AsyncRecommendStream,
    Client,
    RecommendStream,
    RetryPolicy,
    item_count,
    recommend_request,
    search_request,
    service_config,
)
from .errors import BundleRecError, FieldViolation
from .v1 import bundlerec_pb2 as pb

__all__ = [
    "AsyncClient", "AsyncRecommendStream", "BundleRecError", "Client", "FieldViolation", "RecommendStream", "RetryPolicy",
    "TLS", "item_count", "pb", "recommend_request", "search_request", "service_config",
]
