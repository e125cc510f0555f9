"""Bundle assembly and ranking: pure functions over catalog rows (no gRPC, no model).

Scoring follows the seed's idea ``score = similarity x item score``: an anchor's score is its relevance
to the (possibly personalised) query times the item's quality (popularity prior, see export). A bundle's
score rewards strong complements without letting them outweigh relevance::

    bundle = anchor_score x (1 + bonus x sum(strength of complements) / (items_per_bundle - 1))

so a bundle with no complement keeps its anchor's score, and a full bundle of perfect complements gains
at most ``bonus`` (25 % by default).

No one-item bundles when the caller asks for more than one item: ``min_strength`` never empties a bundle (when
every stored complement that passes the filters is weaker, the best of them is kept), and an anchor left
without any complement (none stored, or the filters drop them all) is skipped by :func:`rank_bundles` unless
no anchor yields a bundle with a complement (then the one-item bundles are the answer rather than none).

Known shoppers get repeat-aware complements (P-TopFreq / TIFU-KNN style, docs/bundles.md). ``personal`` is
their affinity in (0, 1]: :func:`count_affinity` of per-item purchase counts (recency-decayed) when there are
any, else :func:`shopper_affinity` of their recent items (position-decayed presence). The candidates are the
anchor's stored list plus the shopper's own items, scored ``w x affinity + (1 - w) x (1 - rank / len(list))``
(``personal_weight`` w, tuned separately for counts and for presence; an item outside the list has rank term 0); the score is the complement's strength, so
bundles of the shopper's habitual items also rank higher, and the reason says so.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from .domain import BundleItemOut, BundleOut, Hit
from .filters import RowFilter


class CatalogView(Protocol):
    prices: np.ndarray
    category_lower: list[str]


class ComplementView(Protocol):
    def of(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def top_strength(self, row: int) -> float: ...


PERSONAL_WEIGHT = 0.85  # mix weight for purchase counts, tuned on validation baskets of training orders
PRESENCE_WEIGHT = 0.75  # mix weight for recent ids only (presence), tuned likewise (docs/bundles.md)
HISTORY_HALF_LIFE = 20.0  # positions in a newest-first item list (~2 Instacart baskets of ~10 items)
COUNT_HALF_LIFE_DAYS = 45.0  # recency half-life of purchase counts, tuned with PERSONAL_WEIGHT
DAY_MS = 86_400_000
PERSONAL_REASON = "with items you often buy"
PREDICTED_REASON = "predicted complements: no order history for this pair yet"  # cold-start model or content


def shopper_affinity(*histories: Sequence[int], half_life: float = HISTORY_HALF_LIFE) -> dict[int, float]:
    """A shopper's decayed purchase frequency from newest-first lists of catalog rows (``recent_item_ids``, the
    events store's recent items): each occurrence adds ``0.5 ** (position / half_life)``, so repeated ids
    count more and older ones less; scaled to (0, 1] by the largest. Empty when there is no history."""
    freq: dict[int, float] = {}
    for rows in histories:
        for pos, row in enumerate(rows):
            freq[row] = freq.get(row, 0.0) + 0.5 ** (pos / half_life)
    top = max(freq.values(), default=0.0)
    return {row: f / top for row, f in freq.items()} if top > 0 else {}


def decayed_count(count: int, first_ms: int | None, last_ms: int | None, now_ms: int,
                  half_life_days: float = COUNT_HALF_LIFE_DAYS) -> float:
    """TIFU-style decayed frequency from aggregates: the ``count`` purchases are taken as evenly spaced between
    ``first_ms`` and ``last_ms`` and each weighs ``0.5 ** (age / half_life)``. Without ``last_ms`` (or a
    half-life <= 0) the plain count; without ``first_ms`` all purchases at ``last_ms``. Future times count as now."""
    if last_ms is None or half_life_days <= 0 or count <= 0:
        return float(max(count, 0))
    hl = half_life_days * DAY_MS
    newest = math.pow(0.5, max(0, now_ms - last_ms) / hl)
    if count == 1 or first_ms is None or first_ms >= last_ms:
        return count * newest
    ratio = math.pow(0.5, (last_ms - first_ms) / (count - 1) / hl)  # decay between consecutive purchases
    return newest * (1.0 - math.pow(ratio, count)) / (1.0 - ratio) if ratio < 1.0 else count * newest


def count_affinity(entries: Iterable[tuple[int, float]]) -> dict[int, float]:
    """Affinity from (catalog row, decayed count) pairs: the largest value per row, scaled to (0, 1] by the
    largest overall; rows with no weight are dropped. Empty when there is nothing."""
    freq: dict[int, float] = {}
    for row, value in entries:
        if value > 0 and value > freq.get(row, 0.0):
            freq[row] = value
    top = max(freq.values(), default=0.0)
    return {row: f / top for row, f in freq.items()} if top > 0 else {}


class PersonalOrder:
    """A shopper's items once per request, best first by their score off the anchor's list (``weight x
    affinity``; ties by row), with :meth:`RowFilter.items` precomputed: lets each anchor look only at the few
    items it can use (see :func:`_personal_candidates`)."""

    def __init__(self, personal: Mapping[int, float], weight: float, allowed: RowFilter) -> None:
        self.rows = sorted(personal, key=lambda r: (-weight * personal[r], r))
        self.ok = allowed.items(np.asarray(self.rows, dtype=np.int64)).tolist() if self.rows else []


def _personal_candidates(anchor: int, complements: ComplementView, personal: Mapping[int, float],
                         weight: float = PERSONAL_WEIGHT, order: PersonalOrder | None = None, need: int = 0,
                         categories: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The anchor's stored list plus the shopper's items, best first by the personal mix: (rows, mix score,
    support = stored baskets containing both, 0 off the list).

    With ``order`` and ``need`` > 0, of the shopper's items off the list only the first ``need`` that the bundle
    could take (allowed, not the anchor, not in its category) are candidates: the others score lower than
    those and cannot be chosen when eligibility does not depend on earlier choices (no price cap)."""
    rows, _, supports = complements.of(anchor)
    listed = rows.tolist()
    n = max(len(listed), 1)
    score = {r: (1.0 - weight) * (1.0 - i / n) for i, r in enumerate(listed)}
    if order is not None and need > 0:
        for r in listed:
            if r in personal:
                score[r] += weight * personal[r]
        cat = categories[anchor] if categories else ""
        taken = 0
        for r, ok in zip(order.rows, order.ok, strict=True):
            if taken == need:
                break
            if ok and r not in score and r != anchor and not (cat and categories[r] == cat):
                score[r] = weight * personal[r]
                taken += 1
    else:
        for r, a in personal.items():
            score[r] = score.get(r, 0.0) + weight * a
    support = dict(zip(listed, supports.tolist(), strict=True))
    best = sorted(score, key=lambda r: (-score[r], r))
    return (np.asarray(best, dtype=np.int64), np.asarray([score[r] for r in best], dtype=np.float64),
            np.asarray([support.get(r, 0) for r in best], dtype=np.int64))


def reason_for(complements: Sequence[tuple[int, float, int]], personal: Mapping[int, float] | None = None) -> str:
    if personal and any(row in personal for row, _, _ in complements):
        support = max((s for _, _, s in complements), default=0)
        return f"{PERSONAL_REASON}; bought together in {support} baskets" if support > 0 else PERSONAL_REASON
    if not complements:
        return "top match for the query"
    support = complements[0][2]
    if support > 0:
        return f"bought together in {support} baskets"
    return PREDICTED_REASON


def make_bundle(
    anchor: Hit,
    catalog: CatalogView,
    complements: ComplementView,
    allowed: RowFilter,
    items_per_bundle: int,
    bonus: float,
    min_strength: float = 0.0,
    anchor_allowed: bool | None = None,
    personal: Mapping[int, float] | None = None,
    personal_weight: float = PERSONAL_WEIGHT,
    personal_order: PersonalOrder | None = None,
) -> BundleOut | None:
    """One bundle for ``anchor``: its best allowed complements (strength >= ``min_strength``, or the single best
    allowed one when all are weaker), within the price cap. None if the anchor is not allowed
    (``anchor_allowed``: already known, e.g. checked in bulk). ``personal``: the shopper's
    affinity (repeat-aware candidates and order, no strength cut), mixed with ``personal_weight``
    (``personal_order``: its :class:`PersonalOrder`, built once per request)."""
    if not (allowed.allows_anchor(anchor.row) if anchor_allowed is None else anchor_allowed):
        return None
    anchor_price = catalog.prices[anchor.row]
    total = 0.0 if math.isnan(anchor_price) else float(anchor_price)
    all_priced = not math.isnan(anchor_price)
    anchor_cat = catalog.category_lower[anchor.row]
    chosen: list[tuple[int, float, int]] = []
    seen = {anchor.row}
    if items_per_bundle > 1:
        if personal:
            need = items_per_bundle - 1 if personal_order is not None and allowed.max_price is None else 0
            rows, strengths, supports = _personal_candidates(anchor.row, complements, personal, personal_weight,
                                                             personal_order, need, catalog.category_lower)
            min_strength = 0.0
        else:
            rows, strengths, supports = complements.of(anchor.row)
        ok = allowed.items(rows).tolist()
        weak = False  # below min_strength: only the best allowed one, and only while the bundle is empty
        for row, strength, support, row_ok in zip(rows.tolist(), strengths.tolist(), supports.tolist(), ok, strict=True):
            if strength < min_strength:
                if chosen:
                    break  # complements are stored strongest first
                weak = True
            if row in seen or not row_ok:
                continue
            if anchor_cat and catalog.category_lower[row] == anchor_cat:
                continue
            price = catalog.prices[row]
            if not math.isnan(price):
                if allowed.max_price is not None and total + price > allowed.max_price:
                    continue
                total += float(price)
            else:
                all_priced = False
            seen.add(row)
            chosen.append((row, strength, support))
            if weak or len(chosen) == items_per_bundle - 1:
                break
    gain = bonus * sum(s for _, s, _ in chosen) / (items_per_bundle - 1) if items_per_bundle > 1 else 0.0
    items = (BundleItemOut(anchor.row, True, anchor.score),) + tuple(
        BundleItemOut(row, False, float(strength)) for row, strength, _ in chosen
    )
    return BundleOut(
        score=float(anchor.score * (1.0 + gain)),
        items=items,
        total_price=round(total, 2) if all_priced else None,
        reason=reason_for(chosen, personal),
    )


def rank_bundles(
    anchors: Sequence[Hit],
    catalog: CatalogView,
    complements: ComplementView,
    allowed: RowFilter,
    max_bundles: int,
    items_per_bundle: int,
    bonus: float,
    min_strength: float = 0.0,
    personal: Mapping[int, float] | None = None,
    personal_weight: float = PERSONAL_WEIGHT,
) -> list[BundleOut]:
    """Bundles for the anchors, best first (ties keep retrieval order), at most ``max_bundles``.

    ``anchors`` must come best-first. With ``items_per_bundle > 1`` one-item bundles (anchors left without a
    complement) are returned only when no anchor yields a bundle with one. A bundle scores at most ``anchor.score x (1 + bonus)``, so once
    ``max_bundles`` bundles are built and the next anchor cannot beat the weakest of them even with
    perfect complements, the remaining anchors are skipped (same result, less work).
    """
    bundles: list[BundleOut] = []
    singles: list[BundleOut] = []  # anchors left without a complement: the answer only when nothing else is
    best: list[float] = []  # min-heap of the max_bundles best scores so far
    anchor_ok = allowed.anchors(np.fromiter((a.row for a in anchors), dtype=np.int64, count=len(anchors))).tolist()
    order = PersonalOrder(personal, personal_weight, allowed) if personal else None
    for anchor, ok in zip(anchors, anchor_ok, strict=True):
        if not ok:
            continue  # make_bundle would refuse it; checked for all anchors at once
        if len(best) == max_bundles:
            if anchor.score * (1.0 + bonus) < best[0]:
                break  # no later anchor can beat the weakest kept bundle
            if not personal and anchor.score * (1.0 + bonus * complements.top_strength(anchor.row)) < best[0]:
                continue  # not even this anchor's strongest complement would lift it enough
        bundle = make_bundle(anchor, catalog, complements, allowed, items_per_bundle, bonus, min_strength,
                             anchor_allowed=True, personal=personal, personal_weight=personal_weight,
                             personal_order=order)
        if bundle is not None and items_per_bundle > 1 and len(bundle.items) == 1:
            if len(singles) < max_bundles:
                singles.append(bundle)
        elif bundle is not None:
            bundles.append(bundle)
            if len(best) < max_bundles:
                heapq.heappush(best, bundle.score)
            elif bundle.score > best[0]:
                heapq.heapreplace(best, bundle.score)
    bundles = bundles or singles
    bundles.sort(key=lambda b: -b.score)
    return bundles[:max_bundles]
