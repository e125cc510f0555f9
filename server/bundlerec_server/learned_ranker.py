"""The learned hybrid ranker (fusion method ``learned``): a LightGBM LambdaRank model over
:mod:`ranking_features`, shipped in the artifact (``ranker/model.txt``, described by ``manifest["ranker"]``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import ArtifactError
from .catalog import Catalog
from .domain import Hit
from .fusion import Candidates, Fusion, fused_scores, top_hits
from .lexical import Lexical
from .ranking_features import FEATURES, TitleFeatures, feature_matrix

RANKER_DIR = "ranker"
RANKER_MODEL = "ranker/model.txt"
# the model scores only the best SCORED_CANDIDATES of the ~100-130 candidates by the ``scores`` fusion (or k, if
# larger): the model's cost is linear in rows; on the Home Depot dev split 50 gives the same NDCG@10 as all
# (0.4680) at a third of the model time (docs/ranking.md)
SCORED_CANDIDATES = 50


# LightGBM reads a feature value within this of 0 as 0 (kZeroThreshold, a float): the compiled model is given the same
ZERO_BAND = float(np.float32(1e-35))
# the compiled model must give LightGBM's scores on probe rows at every split threshold (and one ulp either side)
COMPILED_TOLERANCE = 1e-9
PROBE_ROWS = 2048


class LearnedRanker:
    """The model, the catalog's title evidence and the scoring of one query's candidates. ``engine``: ``compiled``
    runs the trees as machine code (lleaves, compiled at load and checked against LightGBM on probe rows; about
    5x faster on 50 rows), ``lightgbm`` through LightGBM's own predictor."""

    def __init__(self, root: Path, meta: dict[str, Any], catalog: Catalog, engine: str = "compiled",
                 prepared: Prepared | None = None) -> None:
        import lightgbm as lgb

        features = tuple(meta.get("features", ()))
        unknown = [f for f in features if f not in FEATURES]
        if not features or unknown:
            raise ArtifactError(f"{root}: the ranker was trained on features {list(features)}; this server does not "
                                f"compute {unknown or 'an empty list'} (it computes {list(FEATURES)}); retrain it "
                                "(python -m bundlerec_export.train_ranker)")
        # the model's columns of the full feature matrix: a model trained before features were added keeps working
        self.columns = None if features == FEATURES else np.array([FEATURES.index(f) for f in features], dtype=np.int64)
        path = model_path(root, meta)
        if not path.is_file():
            raise ArtifactError(f"{root}: the manifest names a ranker model {path.name} that is missing")
        self.booster = lgb.Booster(model_file=str(path))
        if self.booster.num_feature() != len(features):
            raise ArtifactError(f"{path}: {self.booster.num_feature()} features, the manifest lists {len(features)}")
        # Booster.predict builds a predictor per call; one cached predictor (one thread: a request is small, the
        # server runs many) saves most of the fixed cost of scoring ~100 rows
        predictor = lgb.basic._InnerPredictor.from_booster(self.booster, {"num_threads": 1})

        def reference(x: np.ndarray) -> np.ndarray:
            return np.asarray(predictor.predict(x, num_iteration=-1), dtype=np.float64)

        self._predict: Callable[[np.ndarray], np.ndarray] = reference
        if engine == "compiled":
            self._predict = compiled(path, self.booster, self._predict, prepared.object_code if prepared else None)
        elif engine != "lightgbm":
            raise ValueError(f"ranker engine {engine!r} is not compiled or lightgbm")
        self.engine = engine
        self.meta = meta
        self.titles = prepared.titles if prepared else TitleFeatures(catalog.titles)

    def features(self, lexical: Lexical, text: str, c: Candidates, dense: list[Hit], lexical_hits: list[Hit],
                 keep: np.ndarray | None = None) -> np.ndarray:
        """Feature matrix of the candidates (of ``c.rows[keep]`` when given; set-level features still see all)."""
        dense_rows = np.fromiter((h.row for h in dense), dtype=np.int64, count=len(dense))
        lexical_rows = np.fromiter((h.row for h in lexical_hits), dtype=np.int64, count=len(lexical_hits))
        return feature_matrix(self.titles, lexical, text, c, dense_rows, lexical_rows, keep)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Model scores of a full feature matrix (:data:`FEATURES` columns)."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        if self.columns is not None:
            x = x[:, self.columns]
        return np.asarray(self._predict(x), dtype=np.float64)

    def rank(self, lexical: Lexical, text: str, c: Candidates, dense: list[Hit], lexical_hits: list[Hit],
             k: int, prefilter: Fusion | None = None) -> list[Hit]:
        """Top ``k`` candidates by model score; ties broken by row (deterministic). With ``prefilter`` (a ``scores``
        fusion), only its best ``max(SCORED_CANDIDATES, k)`` candidates are scored by the model. The score returned
        is the logistic of the model's (monotone: same order), in (0, 1) like the other fusions' scores, as
        bundling multiplies anchor scores by a bonus and must not see negative ones."""
        keep = None
        if prefilter is not None and len(c.rows) > max(SCORED_CANDIDATES, k):
            keep = np.sort(np.argsort(-fused_scores(c, prefilter), kind="stable")[: max(SCORED_CANDIDATES, k)])
        rows = c.rows if keep is None else c.rows[keep]
        return top_hits(rows, positive(self.scores(self.features(lexical, text, c, dense, lexical_hits, keep))), k)


def model_path(root: Path, meta: dict[str, Any]) -> Path:
    return root / str(meta.get("file", RANKER_MODEL))


@dataclass(frozen=True)
class Prepared:
    """A ranker's load-time work done elsewhere (:func:`prepare`, in a child process on a hot reload): the title
    evidence and, for the compiled engine, the model's object code."""

    titles: TitleFeatures
    object_code: Path | None = None


def prepare(model: Path, titles: Sequence[str], engine: str, scratch: Path) -> Prepared:
    """What loading a ranker costs in pure Python (seconds of held GIL on a large catalog: the title evidence, the
    trees compiled by lleaves), for a child process; the parent only unpickles the result and loads the object code
    (the compiled model is still checked against LightGBM there)."""
    code = None
    if engine == "compiled":
        import lleaves

        code = scratch / "ranker.o"
        lleaves.Model(model_file=str(model)).compile(cache=str(code))
    return Prepared(TitleFeatures(titles), code)


def compiled(path: Path, booster: Any, reference: Callable[[np.ndarray], np.ndarray],
             object_code: Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The model at ``path`` compiled by lleaves (about 1 s for 150 trees; ``object_code``: compiled already, by
    :func:`prepare`), refused unless it gives ``reference``'s scores on probe rows made of the model's own split
    thresholds, each exactly and one ulp either side."""
    try:
        import lleaves
    except ImportError as exc:
        raise ArtifactError(f"the compiled ranker engine needs lleaves ({exc}); install it or start with "
                            "--ranker-engine lightgbm") from None
    model = lleaves.Model(model_file=str(path))
    model.compile(cache=str(object_code) if object_code is not None else None)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.where(np.abs(x) <= ZERO_BAND, 0.0, x)  # LightGBM's zero band (a fresh C-contiguous float64 array)
        return np.asarray(model.predict(x, n_jobs=1), dtype=np.float64)

    probe = probe_rows(booster)
    gap = float(np.max(np.abs(predict(probe) - reference(probe)), initial=0.0))
    if gap > COMPILED_TOLERANCE:
        raise ArtifactError(f"{path}: the compiled model differs from LightGBM by {gap:g} on probe rows; start with "
                            "--ranker-engine lightgbm")
    return predict


def probe_rows(booster: Any, n: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """``n`` rows whose every value is one of its feature's split thresholds in the model, or one ulp above or
    below it (0 for a feature the model never splits on)."""
    thresholds: list[list[float]] = [[] for _ in range(booster.num_feature())]

    def walk(node: dict[str, Any]) -> None:
        if "split_index" in node:
            thresholds[node["split_feature"]].append(float(node["threshold"]))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    rng = np.random.default_rng(seed)
    columns = []
    for values in thresholds:
        v = np.array(values or [0.0])
        columns.append(rng.choice(np.concatenate([v, np.nextafter(v, np.inf), np.nextafter(v, -np.inf)]), n))
    return np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float64)


def positive(raw: np.ndarray) -> np.ndarray:
    """Model scores mapped to (0, 1) by the logistic function (order kept)."""
    return np.asarray(1.0 / (1.0 + np.exp(-raw)), dtype=np.float64)
