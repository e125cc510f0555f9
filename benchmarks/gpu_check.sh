#!/usr/bin/env bash
# GPU check (issue 4): CUDA EP + fp16 graph + I/O binding, correctness against the artifact's fp32 catalog
# embeddings, encoder timings, then a short open-loop sweep through the real server. < 8 minutes there.
#
# Prepare HERE with `bash benchmarks/gpu_stage.sh` (writes .gpu/1..N, one < 60 MiB part each: the machine takes
# 64 MiB a call and has no network). THERE, through the device tool, on one warm machine:
#   parts 1..N-1: command "bash benchmarks/gpu_check.sh stage", carry [".gpu/K"]   (copies the part aside)
#   part N:       command "bash benchmarks/gpu_check.sh",       carry [".gpu/N"]   (assembles and runs)
# Knobs: GPU_CHECK_PROVIDER=cpu runs the same flow on CPU (a dry run of the plumbing anywhere),
#        WORKER_LIST (server process counts to sweep, default 8; "4 8" measured worse for 4), PROCS (load processes, default 6), RATES,
#        SKIP_ENCODER=1 (skip the encoder check on a rerun).
set -euo pipefail
PARTS=/tmp/bundlerec-gpu-parts
mkdir -p "$PARTS"
cp .gpu/*/part.* "$PARTS"/ 2>/dev/null || true
if [ "${1:-}" = stage ]; then ls -la "$PARTS"; exit 0; fi

OUT=${OUT:-/tmp/gpu-check}
PROVIDER=${GPU_CHECK_PROVIDER:-cuda}
WORKER_LIST=${WORKER_LIST:-8}
PROCS=${PROCS:-6}
RATES=${RATES:-250,500,1000,1500,2000}
G=/tmp/bundlerec-gpu
mkdir -p "$OUT"
if [ ! -f "$G/.unpacked" ]; then
  rm -rf "$G" && mkdir -p "$G"
  echo "== unpack $(ls "$PARTS" | wc -l) parts"
  cat "$PARTS"/part.* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$G', filter='tar')"
fi
mkdir -p client/bundlerec && rm -rf client/bundlerec/v1 && cp -r "$G/client/bundlerec/v1" client/bundlerec/
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
if [ -d "$SP/nvidia" ]; then  # the image's CUDA 13 / cuDNN 9 pip packages, where ort.preload_dlls() looks
  ln -sfn "$SP/nvidia" "$G/site/nvidia"
  export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:${LD_LIBRARY_PATH:-}"
fi
[ -f "$G/.unpacked" ] || python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$G/hnsw" "$G"/hnswlib-*.tar.gz 2>&1 | tail -2
touch "$G/.unpacked"
export PYTHONPATH="$G/site:$G/hnsw:$PWD/client:$PWD/server:$PWD" PYTHONUNBUFFERED=1
ART="$G/.gpuart"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
nproc

echo "== encoder"
[ -n "${SKIP_ENCODER:-}" ] || python3 - "$ART" "$PROVIDER" "$OUT" <<'PY'
import json, statistics, sys, time
import numpy as np
import onnxruntime as ort
from bundlerec_server.encoder import CUDA, Encoder
art, provider, out = sys.argv[1:4]
print("onnxruntime", ort.__version__, ort.get_available_providers())
enc = Encoder(f"{art}/model/fp16.onnx", f"{art}/model/tokenizer.json", max_length=128, provider=provider)
print("provider in use:", enc.provider)
if provider == "cuda":
    assert enc.provider == CUDA, f"CUDA EP not in use: {enc.provider}"
titles = [json.loads(line)["title"] for line in open(f"{art}/items.jsonl")][:1024]
ref = np.load(f"{art}/embeddings.npy", mmap_mode="r")[: len(titles)]
got = enc.encode_many(titles, batch_size=64)
cos = (got * ref).sum(axis=1)
alone = np.stack([enc.encode([t])[0] for t in titles[:64]])
batch_diff = float(np.abs(alone - got[:64]).max())
print(f"fp16 {enc.provider} vs artifact fp32 catalog embeddings: mean cosine {cos.mean():.6f}, min {cos.min():.6f} "
      f"(n={len(titles)}); max |alone - in batch| {batch_diff:.2e}")
enc.warmup(20)
timings = {}
queries = ["organic baby spinach", "gluten free pasta sauce with basil", "sparkling water", "dark chocolate almond bar"]
for bs in (1, 8, 32, 64):
    texts = (queries * 16)[:bs]
    runs = []
    for _ in range(200):
        t = time.perf_counter(); enc.encode(texts); runs.append((time.perf_counter() - t) * 1000)
    runs.sort()
    timings[bs] = {"p50_ms": statistics.median(runs), "p99_ms": runs[int(0.99 * len(runs)) - 1]}
    print(f"fp16 {enc.provider} batch {bs:2d}: p50 {timings[bs]['p50_ms']:.3f} ms, p99 {timings[bs]['p99_ms']:.3f} ms "
          f"({timings[bs]['p50_ms'] / bs:.3f} ms a query)")
fixed = Encoder(f"{art}/model/fp16.onnx", f"{art}/model/tokenizer.json", max_length=64, provider=provider, fixed_rows=32)
f_batched = fixed.encode(titles[:32])
f_alone = np.concatenate([fixed.encode([t]) for t in titles[:32]])
fixed_diff = float(np.abs(f_alone - f_batched).max())
runs = []
for _ in range(200):
    t = time.perf_counter(); fixed.encode(queries[:1]); runs.append((time.perf_counter() - t) * 1000)
runs.sort()
print(f"fixed-shape (32 x 64) runs, as served on CUDA: max |alone - in batch| {fixed_diff:.2e}; "
      f"one query p50 {statistics.median(runs):.3f} ms, p99 {runs[int(0.99 * len(runs)) - 1]:.3f} ms")
json.dump({"fixed_shape_batch_max_abs_diff": fixed_diff, "fixed_shape_one_query_p50_ms": statistics.median(runs),
           "provider": enc.provider, "onnxruntime": ort.__version__, "cosine_mean": float(cos.mean()),
           "cosine_min": float(cos.min()), "batch_max_abs_diff": batch_diff, "encode": timings},
          open(f"{out}/gpu_encoder.json", "w"), indent=2)
PY

sweep() {  # $1 = server worker processes
  local W=$1 PORT=50099
  echo "== server: $W workers, provider $PROVIDER; load: $PROCS processes"
  python3 -m bundlerec_server --artifact "$ART" --provider "$PROVIDER" --host 127.0.0.1 --port $PORT --workers "$W" \
    --encode-workers 2 --max-batch 32 --max-in-flight 256 --max-queue 512 > "$OUT/server_w$W.log" 2>&1 &
  local SERVER=$!
  python3 -m benchmarks.load --target 127.0.0.1:$PORT --sweep --rates "$RATES" --must-run "$RATES" --duration 8 \
    --p99-bound-ms 5 --procs "$PROCS" --json "$OUT/gpu_sweep_w$W.json" --plot "$OUT/gpu_sweep_w$W.png" 2>&1 | grep -v "^WARNING"
  python3 -m bundlerec.cli --target 127.0.0.1:$PORT --json info > "$OUT/info.json"
  python3 - "$OUT/info.json" "$PROVIDER" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
print({k: v for k, v in info.items() if k in ("artifactVersion", "modelVariant", "executionProvider", "itemCount")})
if sys.argv[2] == "cuda":
    assert "CUDAExecutionProvider" in json.dumps(info), "server is not on the CUDA provider"
PY
  kill -TERM $SERVER; wait $SERVER || true
  grep -E "encoder|batch-exact|ERROR|Traceback" "$OUT/server_w$W.log" | cut -d" " -f3- | sort | uniq -c | head -5
}
for W in $WORKER_LIST; do sweep "$W"; done
