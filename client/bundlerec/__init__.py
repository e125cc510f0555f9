"""bundlerec client: typed sync/async access to the bundlerec gRPC service (grpcio + protobuf only)."""

from .client import TLS, AsyncClient, AsyncRecommendStream, Client, RecommendStream, recommend_request, search_request
from .errors import BundleRecError, FieldViolation
from .v1 import bundlerec_pb2 as pb

__all__ = [
    "AsyncClient", "AsyncRecommendStream", "BundleRecError", "Client", "FieldViolation", "RecommendStream", "TLS",
    "pb", "recommend_request", "search_request",
]
