"""CPU per query of each encoder graph of an artifact, alone and in small batches, in-process:

    python -m benchmarks.encoder_cost --artifact artifacts/demo [--queries 200] [--batches 1,4] [--optimized]

Thread CPU time (``time.thread_time``) around ``Encoder.encode``, one intra-op thread as served; each graph's
agreement with fp32 (minimum cosine) and batch-exactness (largest difference between a text encoded alone and
in a batch). ``--optimized`` adds the fp32 graph rewritten by ``onnxruntime.transformers.optimizer`` (fused BERT
operators), to tell graph-node overhead from arithmetic and memory traffic (docs/performance.md). ``--openvino``
adds each graph compiled by OpenVINO (``pip install openvino``; not a dependency of the project): one inference
thread, latency hint, ``--openvino-precision`` (f32 or bf16); its rows are process CPU time, since OpenVINO may run
the request in a thread of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import emit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoder_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--queries-file", type=Path, default=Path(__file__).parent / "queries" / "instacart.txt")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--variants", default="fp32,int8_pertoken,int8")
    p.add_argument("--optimized", action="store_true")
    p.add_argument("--openvino", action="store_true", help="also each graph on OpenVINO's CPU plugin")
    p.add_argument("--openvino-precision", default="f32,bf16")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from bundlerec_server.encoder import Encoder

    model = args.artifact / "model"
    queries = [q.strip() for q in args.queries_file.read_text().splitlines() if q.strip()][: args.queries]
    graphs = {v: model / f"{v}.onnx" for v in args.variants.split(",")}
    tmp = tempfile.TemporaryDirectory()
    if args.optimized:
        from onnxruntime.transformers import optimizer

        fused = optimizer.optimize_model(str(model / "fp32.onnx"), model_type="bert", opt_level=1)
        graphs["fp32_fused"] = Path(tmp.name) / "fp32_fused.onnx"
        fused.save_model_to_file(str(graphs["fp32_fused"]))
    tok = model / "tokenizer.json"
    reference = Encoder(model / "fp32.onnx", tok, provider="cpu", intra_op_threads=1).encode_many(queries)
    runners: dict[str, tuple[Callable[[list[str]], np.ndarray], Callable[[], float]]] = {}
    for name, path in graphs.items():
        enc = Encoder(path, tok, provider="cpu", intra_op_threads=1)
        runners[name] = (enc.encode, time.thread_time)
        if args.openvino:
            for precision in args.openvino_precision.split(","):
                runners[f"openvino_{name}_{precision}"] = (openvino_encode(enc, path, precision), time.process_time)
    rows = []
    for name, (encode, clock) in runners.items():
        encode(queries[:20])
        alone = np.concatenate([encode([q]) for q in queries])
        for bs in (int(b) for b in args.batches.split(",")):
            batched = np.concatenate([encode(queries[i : i + bs]) for i in range(0, len(queries), bs)])
            per_query = []
            for _ in range(2):
                for i in range(0, len(queries), bs):
                    t = clock()
                    encode(queries[i : i + bs])
                    per_query.append((clock() - t) / len(queries[i : i + bs]) * 1e3)
            rows.append({"graph": name, "batch": bs, "cpu_ms_per_query_p50": round(float(np.median(per_query)), 3),
                         "cpu_ms_per_query_mean": round(float(np.mean(per_query)), 3),
                         "min_cosine_vs_fp32": round(float((alone * reference).sum(1).min()), 4),
                         "batch_exact_max_diff": float(np.abs(alone - batched).max())})
            print(json.dumps(rows[-1]))
    out = {"artifact": str(args.artifact), "queries": len(queries), "rows": rows,
           "loadavg": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count()}
    emit(out, args.json, echo=False)
    return 0


def openvino_encode(enc: Any, path: Path, precision: str) -> Callable[[list[str]], np.ndarray]:
    """``enc``'s tokenisation and pooling around ``path`` compiled by OpenVINO (one thread, latency hint)."""
    import openvino as ov

    from bundlerec_server.encoder import mean_pool_normalize

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]

    def encode(texts: list[str]) -> np.ndarray:
        feeds = enc.tokenize(texts)
        hidden = request.infer({k: feeds[k] for k in names})[compiled.outputs[0]]
        out: np.ndarray = mean_pool_normalize(np.asarray(hidden, dtype=np.float32), feeds["attention_mask"])
        return out

    return encode


if __name__ == "__main__":
    sys.exit(main())
