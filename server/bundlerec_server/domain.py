"""Plain request/response types of the domain layer (no protobuf, no gRPC)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Mode(enum.StrEnum):
    DENSE = "dense"
    LEXICAL = "lexical"
    HYBRID = "hybrid"


class Stop(enum.StrEnum):
    COMPLETE = "complete"
    DEADLINE = "deadline"
    NO_MATCH = "no_match"


class RerankOutcome(enum.StrEnum):
    NOT_USED = "not_used"
    APPLIED = "applied"
    SKIPPED_DEADLINE = "skipped_deadline"


@dataclass(frozen=True)
class Filters:
    include_categories: frozenset[str] = frozenset()  # lower-cased
    exclude_categories: frozenset[str] = frozenset()  # lower-cased
    max_price: float | None = None
    exclude_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ItemCount:
    """How often a shopper bought an item, and when first and last (ms since the epoch; None = unknown)."""

    item_id: str
    count: int
    first_ms: int | None = None
    last_ms: int | None = None


@dataclass(frozen=True)
class History:
    """A shopper's recorded history: recent distinct items (newest first) and per-item purchase counts."""

    recent: tuple[str, ...] = ()
    counts: tuple[ItemCount, ...] = ()


@dataclass(frozen=True)
class RecommendQuery:
    query: str
    user_id: str = ""
    recent_item_ids: tuple[str, ...] = ()
    recent_item_counts: tuple[ItemCount, ...] = ()
    max_bundles: int = 5
    items_per_bundle: int = 3
    filters: Filters = Filters()
    mode: Mode | None = None
    rerank: bool | None = None  # None: the server's default


@dataclass(frozen=True)
class SearchQuery:
    query: str
    k: int = 10
    filters: Filters = Filters()
    mode: Mode | None = None
    rerank: bool | None = None  # None: the server's default


@dataclass(frozen=True)
class Hit:
    """A retrieved item: catalog row and its relevance score (cosine x quality for dense)."""

    row: int
    score: float


@dataclass(frozen=True)
class BundleItemOut:
    row: int
    is_anchor: bool
    score: float


@dataclass(frozen=True)
class BundleOut:
    score: float
    items: tuple[BundleItemOut, ...]
    total_price: float | None
    reason: str


@dataclass
class Personalization:
    """What personalised a query vector: history rows used, and ids that were skipped."""

    rows: list[int] = field(default_factory=list)
    unknown_ids: list[str] = field(default_factory=list)

    @property
    def applied(self) -> bool:
        return bool(self.rows)
