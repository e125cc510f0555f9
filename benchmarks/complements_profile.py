"""CPU seconds of the parts of ``complement_ranker.rank_complements`` on an Instacart folder (timers wrapped
around candidate generation, features, LightGBM training and prediction), for build-time A/B runs.

    python -m benchmarks.complements_profile ../shared/data/instacart '{"share_unordered": false}'
    python -m benchmarks.complements_profile ../shared/data/instacart '{"share_unordered": true}'
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    import lightgbm as lgb

    from bundlerec_export import complement_ranker as cr
    from bundlerec_export import datasets

    parts: dict[str, float] = {}

    def timed(name: str, f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.process_time()
            try:
                return f(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.process_time() - t
        return wrapper

    cr.CandidateModel.__init__ = timed("mine", cr.CandidateModel.__init__)  # type: ignore[method-assign]
    cr.CandidateModel.candidates = timed("candidates", cr.CandidateModel.candidates)  # type: ignore[method-assign]
    cr.CandidateModel.features = timed("features", cr.CandidateModel.features)  # type: ignore[method-assign]
    lgb.train = timed("lgb_train", lgb.train)
    lgb.Booster.predict = timed("lgb_predict", lgb.Booster.predict)  # type: ignore[method-assign]
    ds = datasets.load_instacart(Path(argv[0]))
    rows_of = {it.id: i for i, it in enumerate(ds.items)}
    baskets = [[rows_of[i] for i in b.items] for b in ds.baskets]
    cfg = cr.RankerConfig(**(json.loads(argv[1]) if len(argv) > 1 else {}))
    t0, c0 = time.perf_counter(), time.process_time()
    _, rep = cr.rank_complements(baskets, len(ds.items), users=[b.user_id for b in ds.baskets],
                                 order_numbers=[b.order_number for b in ds.baskets], titles=[it.title for it in ds.items],
                                 aisles=[it.category for it in ds.items], cfg=cfg)
    print(json.dumps({"items": len(ds.items), "anchors_scored": rep["anchors_scored"],
                      "cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1),
                      "load": os.getloadavg(), "cpu_parts_s": {k: round(v, 1) for k, v in parts.items()},
                      "timings_s": rep["timings_s"], "best_iteration": rep["validation"]["best_iteration"],
                      "holdout_recall": rep["validation"].get("holdout_recall")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
