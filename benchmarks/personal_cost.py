"""CPU ms per call of the bundle step (affinity + rank_bundles) over an artifact's complement lists: no history,
50 recent ids, 200 purchase counts; interleaved, 64 random anchors, 5 bundles x 3 items.

    python -m benchmarks.personal_cost runs/ic-bq [rounds]
"""

import json
import os
import random
import sys
import time

import numpy as np

from bundlerec_server import artifact as A
from bundlerec_server.bundling import (
    PERSONAL_WEIGHT,
    PRESENCE_WEIGHT,
    count_affinity,
    decayed_count,
    rank_bundles,
    shopper_affinity,
)
from bundlerec_server.catalog import Catalog
from bundlerec_server.domain import Filters, Hit
from bundlerec_server.filters import RowFilter

root = sys.argv[1] if len(sys.argv) > 1 else "runs/ic-bq"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 300
cat = Catalog.from_table(A.ItemTable.read(os.path.join(root, A.ITEMS)))
comp = A.Complements.read(os.path.join(root, A.COMPLEMENTS))
allowed = RowFilter.resolve(Filters(), cat)
rng = random.Random(0)
n = len(cat)
now = int(time.time() * 1000)


def run(kind: str) -> float:
    anchors = [Hit(r, 1.0 - i / 100) for i, r in enumerate(rng.sample(range(n), 64))]
    t = time.process_time()
    if kind == "none":
        personal, w = None, PERSONAL_WEIGHT
    elif kind == "ids":
        personal, w = shopper_affinity(rng.sample(range(n), 50)), PRESENCE_WEIGHT
    else:
        rows = rng.sample(range(n), 200)
        personal = count_affinity((r, decayed_count(rng.randint(1, 9), now - 90 * 86400000,
                                                    now - rng.randint(0, 60) * 86400000, now)) for r in rows)
        w = PERSONAL_WEIGHT
    rank_bundles(anchors, cat, comp, allowed, 5, 3, 0.25, 0.1, personal=personal, personal_weight=w)
    return (time.process_time() - t) * 1000


res: dict[str, list[float]] = {k: [] for k in ("none", "ids", "counts")}
for _ in range(rounds):
    for k in res:
        res[k].append(run(k))
print(json.dumps({k: {"median_ms": round(float(np.median(v)), 3), "p90_ms": round(float(np.percentile(v, 90)), 3)}
                  for k, v in res.items()}), "load", os.getloadavg())
