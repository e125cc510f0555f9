"""One typed, frozen settings object. CLI flags and ``BUNDLEREC_*`` environment variables map onto it.

Precedence: CLI flag > environment variable > default. Every field ``name`` has the flag ``--name``
(underscores as dashes) and the variable ``BUNDLEREC_NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "BUNDLEREC_"


@dataclass(frozen=True)
class Settings:
    # --- artifact & runtime
    artifact: Path = field(default=Path("artifacts/demo"), metadata={"help": "artifact folder to serve"})
    provider: str = field(default="auto", metadata={"help": "ONNX Runtime provider: auto, cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    model_variant: str = field(default="", metadata={"help": "force an encoder graph: fp32, int8, int8_pertoken or fp16 ('' = best for the provider)"})
    intra_op_threads: int = field(default=1, metadata={"help": "ORT intra-op threads per run (0 = ORT default); concurrency comes from encode_workers"})
    verify_checksums: bool = field(default=True, metadata={"help": "verify every artifact file against the manifest at load"})
    # --- network
    host: str = field(default="[::]", metadata={"help": "address to bind"})
    port: int = field(default=50051, metadata={"help": "port to bind (0 = any free port)"})
    workers: int = field(default=1, metadata={"help": "server processes sharing the port (SO_REUSEPORT); >1 needs a fixed port"})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "max gRPC message size, both directions"})
    tls_cert: Path | None = field(default=None, metadata={"help": "server certificate chain (PEM): enables TLS"})
    tls_key: Path | None = field(default=None, metadata={"help": "server private key (PEM)"})
    tls_client_ca: Path | None = field(default=None, metadata={"help": "CA (PEM) for client certificates: enables mutual TLS, a client certificate is required"})
    auth_token_file: Path | None = field(default=None, metadata={"help": "file holding the bearer token callers must send (authorization: Bearer ...)"})
    auth_token: str = field(default="", repr=False, metadata={"help": "bearer token callers must send; prefer auth_token_file or the environment"})
    metrics_port: int = field(default=0, metadata={"help": "serve Prometheus metrics over HTTP on this port (0 = off)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address for the metrics endpoint"})
    grace_s: float = field(default=10.0, metadata={"help": "shutdown grace period for in-flight calls"})
    # --- request handling
    deadline_margin_ms: float = field(default=3.0, metadata={"help": "end a stream this long before the call's deadline"})
    default_max_bundles: int = field(default=5, metadata={"help": "bundles when a request says 0"})
    max_bundles_cap: int = field(default=50, metadata={"help": "largest max_bundles accepted"})
    default_items_per_bundle: int = field(default=3, metadata={"help": "items per bundle when a request says 0"})
    max_items_per_bundle_cap: int = field(default=10, metadata={"help": "largest max_items_per_bundle accepted"})
    max_query_chars: int = field(default=512, metadata={"help": "longest query accepted, in characters"})
    max_query_tokens: int = field(default=128, metadata={"help": "longest query accepted, in encoder tokens (the encoder reads only the first encoder.query_truncate_tokens of the manifest)"})
    max_search_k: int = field(default=100, metadata={"help": "largest Search k accepted"})
    max_recent_items: int = field(default=50, metadata={"help": "most recent_item_ids accepted"})
    max_recent_item_counts: int = field(default=200, metadata={"help": "most recent_item_counts accepted"})
    max_excluded_items: int = field(default=200, metadata={"help": "most filters.exclude_item_ids accepted"})
    max_categories: int = field(default=50, metadata={"help": "most categories in each category filter"})
    encode_workers: int = field(default=1, metadata={"help": "threads running the encoder, retrieval and bundling (ORT and hnswlib release the GIL); one measured best on 2 cores (docs/performance.md)"})
    max_batch: int = field(default=16, metadata={"help": "most queries encoded in one micro-batch (1 disables batching)"})
    max_batch_wait_ms: float = field(default=0.0, metadata={"help": "wait this long for a micro-batch to fill (0 = take what is queued when a worker is free)"})
    max_in_flight: int = field(default=32, metadata={"help": "calls worked on at once; more wait in the queue"})
    max_queue: int = field(default=64, metadata={"help": "calls allowed to wait for a slot; beyond it RESOURCE_EXHAUSTED at once"})
    queue_target_ms: float = field(default=5.0, metadata={"help": "CoDel target for the admission queue: once even the shortest wait over 100 ms exceeds it, queued calls waiting 2x this long are refused (0 = plain FIFO)"})
    target_latency_ms: float = field(default=0.0, metadata={"help": "adapt the in-flight limit (AIMD per 100 ms window, up to max_in_flight) so the 99th percentile of admitted calls' latency (queue wait + whole call) stays within this (0 = fixed limit)"})
    # --- events & reload
    events_db: str = field(default="", metadata={"help": "event store for RecordEvents: a SQLite file path or sqlite:///path (WAL, one machine), or postgresql://user@host:port/db (shared by replicas); other schemes are refused; '' disables events"})
    shared_events: bool = field(default=False, metadata={"help": "read users' recent events from the SQLite file on every call (set for each of several workers); PostgreSQL always does"})
    max_events_per_call: int = field(default=10_000, metadata={"help": "most events in one RecordEvents call"})
    recent_events_per_user: int = field(default=20, metadata={"help": "recent items per user blended into Recommend"})
    purchase_counts_per_user: int = field(default=200, metadata={"help": "items of a user's recorded purchase counts (the most by decayed count) that personalise Recommend's complements (0 = counts off)"})
    watch_interval_s: float = field(default=0.0, metadata={"help": "poll the artifact's manifest this often and hot-reload a new version (0 = only on SIGHUP)"})
    # --- ranking
    anchor_pool: int = field(default=64, metadata={"help": "anchors retrieved before filtering and bundling"})
    history_weight: float = field(default=0.3, metadata={"help": "weight of the history vector in the query blend"})
    personal_weight: float = field(default=0.85, metadata={"help": "weight of a known shopper's purchase counts (decayed affinity) against the anchor's stored list when choosing complements, in [0, 1]"})
    presence_weight: float = field(default=0.75, metadata={"help": "the same weight when the shopper's history is only recent item ids (no counts), in [0, 1]"})
    count_half_life_days: float = field(default=45.0, metadata={"help": "recency half-life of purchase counts in days (<= 0: plain counts)"})
    min_relevance: float = field(default=0.3, metadata={"help": "dense anchors need at least this cosine to the query; below it nothing matched"})
    min_complement_strength: float = field(default=0.1, metadata={"help": "weakest complement association kept in a bundle, in [0, 1]"})
    complement_bonus: float = field(default=0.25, metadata={"help": "bundle score = anchor score x (1 + bonus x mean complement strength)"})
    ef_search: int = field(default=0, metadata={"help": "HNSW ef at query time (0 = the artifact's: tuned on judgments where it has them, else its index's recall-tuned value)"})
    retrieval_mode: str = field(default="", metadata={"help": "default retrieval: dense, lexical or hybrid ('' = the artifact's recommendation)"})
    fusion: str = field(default="", metadata={"help": "hybrid fusion: rrf, blend, scores or learned (the artifact's LambdaRank model) ('' = the artifact's tuned choice)"})
    fusion_alpha: float = field(default=-1.0, metadata={"help": "blend weight of dense scores in [0, 1] (-1 = the artifact's tuned value)"})
    fusion_coverage: float = field(default=-1.0, metadata={"help": "scores fusion: weight of query-word coverage (-1 = the artifact's tuned value)"})
    reload_offload: bool = field(default=True, metadata={"help": "on a hot reload, build the GIL-heavy parts (the learned ranker's title evidence and compiled trees, the spelling corrector: seconds of pure Python on a large catalog) in a child process, so the calls being served keep their latency"})
    ranker_engine: str = field(default="compiled", metadata={"help": "how the learned ranker's trees run: compiled (lleaves: the LightGBM model compiled to machine code at load, checked against LightGBM) or lightgbm", "choices": ("compiled", "lightgbm")})
    spell_correction: bool = field(default=True, metadata={"help": "correct query words unknown to the catalog before BM25"})
    rerank: str = field(default="", metadata={"help": "cross-encoder re-ranking of the top hits by default: on (refused at start if the artifact has no cross-encoder), off (not loaded; requests asking for it are refused) or '' (the artifact's dev-tuned choice); requests may opt in or out", "choices": ("", "on", "off")})
    rerank_depth: int = field(default=0, metadata={"help": "hits re-ranked by the cross-encoder, 2 to 100 (0 = the depth it was trained on)"})
    rerank_recommend: bool = field(default=True, metadata={"help": "also re-rank Recommend's anchors (when the deadline allows)"})
    rerank_reserve_ms: float = field(default=5.0, metadata={"help": "re-rank only when the call's remaining deadline exceeds the estimated re-rank cost by this much (plus deadline_margin_ms); otherwise skip it and say so"})
    # --- vector backend (dense retrieval)
    vector_backend: str = field(default="hnsw", metadata={"help": "dense index: hnsw (the artifact's hnswlib file, in process) or milvus://host:port[?alias=NAME] (the artifact version's collection published by bundlerec-export --publish-milvus; token in BUNDLEREC_MILVUS_TOKEN)"})
    # --- observability
    metrics_dir: Path | None = field(default=None, metadata={"help": "with --workers > 1 and --metrics-port: folder where workers write Prometheus metrics for the one aggregate endpoint (emptied at start; default: a fresh temporary folder)"})
    tracing: str = field(default="off", metadata={"help": "OpenTelemetry tracing: off, console (spans as JSON on stdout) or otlp (OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT)", "choices": ("off", "console", "otlp")})
    tracing_service_name: str = field(default="bundlerec", metadata={"help": "service.name of the traces"})
    # --- logging
    log_level: str = field(default="INFO", metadata={"help": "logging level"})
    # --- latency
    query_cache_size: int = field(default=0, metadata={"help": "query embeddings kept per artifact in an LRU (exact text, whitespace-collapsed where the tokenizer provably ignores it; emptied on reload); 0 = off. About 1.7 KB an entry at dim 384: 4096 ~ 7 MB"})
    reply_cache: bool = field(default=True, metadata={"help": "with the query cache on, also keep whole Recommend replies (same size) for requests nothing personalises (no user, recent items or counts; no re-ranking), so a hit skips retrieval and bundling, and whole Search replies (same size) for requests that do not re-rank; emptied on reload. About 6.6 KB a Recommend entry at 5 bundles x 3 items: 4096 ~ 27 MB"})
    cache_hits_on_loop: bool = field(default=True, metadata={"help": "a query-cache hit runs its retrieval and bundling on the event loop (nothing to encode: no thread hop, no wait behind a batch's encode); off: in an encode worker like a miss"})
    encode_inline: bool = field(default=False, metadata={"help": "a query of the only call in flight that finds the encode workers idle is encoded, retrieved and bundled on the event loop (no thread hop; the loop is busy for those ~2 ms); measured in docs/performance.md"})
    # --- replicas (client-side load balancing: docs/replicas.md)
    max_connection_age_s: float = field(default=300.0, metadata={"help": "close each client connection (GOAWAY) after about this long, so clients rebalance onto new replicas; gRPC adds up to 10 percent jitter (0 = never)"})
    max_connection_age_grace_s: float = field(default=30.0, metadata={"help": "after max_connection_age_s, calls in flight get this long to finish before the connection is closed"})
    replica_id: str = field(default="", metadata={"help": "sent to callers in the bundlerec-replica trailer of every successful call, e.g. the pod name ('' = not sent)"})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Builds settings from defaults, then ``env`` (default ``os.environ``), then ``argv`` flags."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(hints[f.name], raw, f"{ENV_PREFIX}{f.name.upper()}")
        parser = cls.argument_parser()
        args = parser.parse_args(list(argv) if argv is not None else [])
        for f in fields(cls):
            val = getattr(args, f.name)
            if val is not None:
                values[f.name] = val
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog="bundlerec-server",
            description="bundlerec gRPC server. Every flag can also be set as BUNDLEREC_<NAME> in the environment.",
        )
        hints = get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            typ = hints[f.name]
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{f.metadata.get('help', '')} (default: {f.default})"}
            if typ is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = typ if typ in (int, float, str) else Path  # Path and Path | None
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kwargs)
        return parser

    def fusion_overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.fusion:
            out["method"] = self.fusion
        if self.fusion_alpha >= 0:
            out["alpha"] = self.fusion_alpha
        if self.fusion_coverage >= 0:
            out["coverage"] = self.fusion_coverage
        return out

    def token(self) -> str:
        """The bearer token required from callers ('' = no token authentication)."""
        if self.auth_token_file:
            return self.auth_token_file.read_text().strip()
        return self.auth_token

    def check(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} out of range")
        if self.provider not in ("auto", "cpu", "cuda"):
            problems.append(f"provider {self.provider!r} is not auto, cpu or cuda")
        if self.retrieval_mode not in ("", "dense", "lexical", "hybrid"):
            problems.append(f"retrieval_mode {self.retrieval_mode!r} is not dense, lexical or hybrid")
        if self.model_variant not in ("", "fp32", "int8", "int8_pertoken", "fp16"):
            problems.append(f"model_variant {self.model_variant!r} is not fp32, int8, int8_pertoken or fp16")
        if self.fusion not in ("", "rrf", "blend", "scores", "learned"):
            problems.append(f"fusion {self.fusion!r} is not rrf, blend, scores or learned")
        if self.ranker_engine not in ("compiled", "lightgbm"):
            problems.append(f"ranker_engine {self.ranker_engine!r} is not compiled or lightgbm")
        if self.rerank not in ("", "on", "off"):
            problems.append(f"rerank {self.rerank!r} is not on, off or ''")
        if self.rerank_depth != 0 and not 2 <= self.rerank_depth <= 100:
            problems.append("rerank_depth must be 0 (the trained depth) or in [2, 100]")
        if self.rerank_reserve_ms < 0:
            problems.append("rerank_reserve_ms must be >= 0")
        if self.fusion_alpha > 1.0:
            problems.append("fusion_alpha must be <= 1")
        if not -1.0 <= self.min_relevance <= 1.0:
            problems.append("min_relevance is a cosine in [-1, 1]")
        if not 0.0 <= self.history_weight < 1.0:
            problems.append("history_weight must be in [0, 1)")
        for name in ("default_max_bundles", "max_bundles_cap", "default_items_per_bundle", "max_items_per_bundle_cap", "anchor_pool", "max_query_chars", "max_search_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("encode_workers", "max_in_flight"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.workers < 1:
            problems.append("workers must be >= 1")
        if self.query_cache_size < 0:
            problems.append("query_cache_size must be >= 0 (0 = off)")
        if self.workers > 1 and self.port == 0:
            problems.append("workers > 1 share one port through SO_REUSEPORT: give a fixed --port")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.max_queue < 0:
            problems.append("max_queue must be >= 0")
        if self.queue_target_ms < 0:
            problems.append("queue_target_ms must be >= 0")
        if self.target_latency_ms < 0:
            problems.append("target_latency_ms must be >= 0")
        if self.max_connection_age_s < 0 or self.max_connection_age_grace_s < 0:
            problems.append("max_connection_age_s and max_connection_age_grace_s must be >= 0")
        if not (0.0 <= self.personal_weight <= 1.0 and 0.0 <= self.presence_weight <= 1.0):
            problems.append("personal_weight and presence_weight must be in [0, 1]")
        if self.purchase_counts_per_user < 0 or self.max_recent_item_counts < 0:
            problems.append("purchase_counts_per_user and max_recent_item_counts must be >= 0")
        if self.default_max_bundles > self.max_bundles_cap:
            problems.append("default_max_bundles exceeds max_bundles_cap")
        if self.tracing not in ("off", "console", "otlp"):
            problems.append(f"tracing {self.tracing!r} is not off, console or otlp")
        if self.events_db:
            from .events import parse_events_db

            try:
                parse_events_db(self.events_db)
            except ValueError as exc:
                problems.append(str(exc))
        try:
            from .vectors import check_backend

            check_backend(self.vector_backend)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))


def _coerce(typ: Any, raw: str, name: str) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
        return Path(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a valid {getattr(typ, '__name__', typ)}") from exc
