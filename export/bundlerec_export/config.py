"""``BuildConfig``: every setting of an artifact build, with its default (the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

COMPLEMENT_METHODS = ("learned", "npmi")
COLD_START_SPACES = ("base", "served")
_PATH_FIELDS = ("data_dir", "catalog", "orders", "base_model", "finetune_judgments", "finetune_cache", "ranker_judgments",
                "student_texts")


@dataclass
class BuildConfig:
    dataset: str
    out: Path
    data_dir: Path | None = None
    catalog: Path | None = None
    orders: Path | None = None
    base_model: Path | None = None  # default: the packaged all-MiniLM-L6-v2
    limit: int | None = None  # first N items (tests)
    min_int8_cosine: float = 0.98  # fail when the int8 mean cosine to fp32 is lower
    agreement_sample: int = 200
    seed: int = 0
    embed_batch_size: int = 64
    # catalog embedding on Ray Data (bundlerec_export.ray_embed): off = one process
    ray: bool = False
    ray_address: str | None = None  # a cluster (else RAY_ADDRESS, else a local Ray started in-process); sets ray
    ray_actors: int = 2  # the actor pool grows from 1 to this many ONNX Runtime actors
    ray_actor_cpus: float = 0.5  # CPUs reserved per actor
    # hnswlib
    hnsw_m: int = 16
    ef_construction: int = 200
    ef_search: int = 64  # the floor; the build raises it until recall@64 >= 0.98 (tune_ef)
    tune_ef: bool = True
    # complements: "learned" (LightGBM LambdaRank re-ranker, complement_ranker; needs orders with shopper ids, else
    # falls back to "npmi" with a log line) or "npmi" (complements.mine_cooccurrence)
    complements: str = "learned"
    # items without order evidence: a catalog without orders gets lists from the shipped cold-start model
    # (cold_start.py) when it is embedded by the base MiniLM the model was trained on; never-ordered items of a
    # catalog with orders get popularity + their aisle context (cold_start.context_complements)
    cold_start: bool = True
    # the embeddings the cold-start model reads: "base" = the base MiniLM's (the served ones when the encoder is the
    # base model, else the titles embedded once more with it, cached in <out>.work; bundlerec_export.base_space),
    # "served" = the served encoder's as they are (refused when their width is not the model's)
    cold_start_space: str = "base"
    # anti-hub correction (cold_start.FOREIGN_HUB_CORRECTION) of the lists of a catalog without orders or categories
    cold_start_hub: bool = True
    ranker_threads: int = 2  # LightGBM threads of the learned complements
    min_support: int = 2
    top_k: int = 20
    shrinkage: float = 50.0
    user_level_evidence: bool = False  # count co-occurrence once per user (default: per basket, >= 2 users a pair)
    min_users: int = 2
    related_band: tuple[float, float] = (0.45, 0.85)
    # bm25s lexical index
    lexical: bool = True
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    threads: int = 0  # 0: let the libraries decide
    progress: bool = True
    # fine-tuning of the encoder on query-product judgments (bundlerec_export.finetune); off when base_model is set
    finetune_judgments: Path | None = None
    finetune_epochs: int = 2
    finetune_cache: Path | None = None  # default: <out>.work next to the artifact
    finetune_options: dict[str, Any] = field(default_factory=dict)  # other FinetuneConfig fields
    # a shallower served encoder (bundlerec_export.shrink): keeps these layers of the encoder the build would
    # otherwise serve (the teacher: fine-tuned, --base-model or the packaged MiniLM), distilled on its vectors of
    # the catalog titles, the judgments' TRAIN queries and the lines of student_texts (e.g. a query log); then
    # fine-tuned student_finetune_epochs on the judgments when the teacher was fine-tuned. () = the teacher itself
    student_layers: tuple[int, ...] = ()
    student_texts: Path | None = None
    student_options: dict[str, Any] = field(default_factory=dict)  # DistillSettings fields
    student_finetune_epochs: int = 1
    student_finetune_lr: float = 2e-5
    # learned hybrid ranker (bundlerec_export.train_ranker): trained when judgments exist (ranker_judgments, else
    # finetune_judgments) and the artifact has a lexical index; off with ranker=False
    ranker: bool = True
    ranker_judgments: Path | None = None
    # cross-encoder re-ranker (bundlerec_export.cross_encoder): trained after tune when judgments exist and this is
    # on; the served default re-ranks only if it beats the served ranking on dev
    cross_encoder: bool = False
    cross_encoder_options: dict[str, Any] = field(default_factory=dict)  # CrossEncoderConfig fields
    extra: dict[str, Any] = field(default_factory=dict)
    # after the build: publish the vectors to Milvus (milvus://host:port[?alias=NAME]; '' = no)
    publish_milvus: str = ""

    @property
    def judgments(self) -> Path | None:
        """The judgments the ranker and the serving tuning use (None: neither runs)."""
        return self.ranker_judgments or self.finetune_judgments

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in _PATH_FIELDS:
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, Path(val))
        if not 0 < self.agreement_sample:
            raise ValueError("agreement_sample must be positive")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be positive")
        if self.ray_address:
            self.ray = True
        if self.ray_actors < 1 or self.ray_actor_cpus <= 0:
            raise ValueError("ray_actors and ray_actor_cpus must be positive")
        if self.complements not in COMPLEMENT_METHODS:
            raise ValueError(f"complements must be one of {COMPLEMENT_METHODS}")
        if self.cold_start_space not in COLD_START_SPACES:
            raise ValueError(f"cold_start_space must be one of {COLD_START_SPACES}")
        if self.finetune_epochs < 1:
            raise ValueError("finetune_epochs must be positive")
        self.student_layers = tuple(int(i) for i in self.student_layers)
        if any(i < 0 for i in self.student_layers) or len(set(self.student_layers)) != len(self.student_layers):
            raise ValueError("student_layers must be distinct layer numbers >= 0")
        if self.student_finetune_epochs < 0 or self.student_finetune_lr <= 0:
            raise ValueError("student_finetune_epochs must be >= 0 and student_finetune_lr positive")

    def as_manifest(self) -> dict[str, Any]:
        """The manifest's ``build_config``: JSON types, ``progress`` left out."""
        d: dict[str, Any] = to_json(asdict(self))
        d.pop("progress", None)
        d.pop("publish_milvus", None)  # where it was published is not part of the artifact
        return d


def to_json(value: Any) -> Any:
    """``value`` with paths as strings and tuples as lists, through dicts and lists (for manifests and logs)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def defaults() -> dict[str, Any]:
    """Field name -> default value of every ``BuildConfig`` field that has a plain default."""
    return {f.name: f.default for f in fields(BuildConfig) if f.default is not MISSING}
