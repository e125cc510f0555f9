"""User-level splits of orders: the latest order of each shopper is held out, earlier ones are mined.

``latest_per_user(users, order_numbers)`` marks, for every shopper, the order with the highest
``order_number`` (ties: the later position). ``user_level_split`` applies it twice:

* **test** = each user's latest order (a user with a single order has that order in test and nothing mined);
* **train** = every other order: all that mining may see;
* **val** = each training user's latest *training* order (the second-latest overall), a subset of train;
* **fit** = train minus val: what features are mined on when labels come from val.

Orders without a user id are their own shopper of one order, so they go to test. Nothing here looks at
items: the split is a function of (user, order_number, position) only, deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def latest_per_user(users: Sequence[str], order_numbers: Sequence[int], mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask: True at each user's latest order among those where ``mask`` is True (all by default).

    An empty user id makes the order its own user (so it is always "latest")."""
    n = len(users)
    if len(order_numbers) != n:
        raise ValueError("users and order_numbers must have the same length")
    allowed = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    best: dict[str, tuple[int, int]] = {}
    out = np.zeros(n, dtype=bool)
    for k in np.flatnonzero(allowed).tolist():
        u = users[k]
        if not u:
            out[k] = True
            continue
        key = (int(order_numbers[k]), k)
        if u not in best or key > best[u]:
            best[u] = key
    for _, k in best.values():
        out[k] = True
    return out


@dataclass(frozen=True)
class UserSplit:
    """Index arrays (positions in the order list), each sorted."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray
    fit: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {k: int(len(getattr(self, k))) for k in ("train", "test", "val", "fit")}


def user_level_split(users: Sequence[str], order_numbers: Sequence[int]) -> UserSplit:
    """test = latest order per user; train = the rest; val = latest train order per user; fit = train - val."""
    test_mask = latest_per_user(users, order_numbers)
    train_mask = ~test_mask
    val_mask = latest_per_user(users, order_numbers, train_mask)
    fit_mask = train_mask & ~val_mask
    return UserSplit(*(np.flatnonzero(m) for m in (train_mask, test_mask, val_mask, fit_mask)))
