#!/usr/bin/env bash
# GPU check (issue 4): CUDA EP + fp16 graph + I/O binding, a short sweep, figures printed; < 8 minutes.
#
# Prepare HERE (no network there), from the repo root:
#   echo /.whl/ >> .git/info/exclude; echo /.gpuart/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl"
#   for pl in manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do P="$P --platform $pl"; done
#   python3 -m pip download $P onnxruntime-gpu==1.31.1 hnswlib==0.8.0 grpcio-health-checking==1.85.1 \
#       grpcio-reflection==1.85.1 grpcio-status==1.85.1 googleapis-common-protos bm25s PyStemmer
#   (hnswlib has no wheel: download its sdist with --no-binary hnswlib instead; it builds there with pybind11)
#   mkdir -p .gpuart && cp -r artifacts/demo/{manifest.json,items.jsonl,embeddings.npy,index.hnsw,complements.npz,lexical} .gpuart/
#   mkdir -p .gpuart/model && cp artifacts/demo/model/{fp16.onnx,tokenizer.json} .gpuart/model/
#   (the server verifies checksums of the files it finds listed: start it with --no-verify-checksums for this
#    partial copy; fp32/int8 graphs are left behind to fit the 64 MiB transfer limit)
# Run THERE through the device tool: command "bash benchmarks/gpu_check.sh",
#   carry [".whl", ".gpuart", "client/bundlerec/v1"] (the generated stubs are gitignored, so they must be carried).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl/*.tar.gz 2>&1 | tail -3 || true
export PYTHONPATH=/tmp/site:$PWD/client:$PWD/server:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import onnxruntime as ort, sys
print("onnxruntime", ort.__version__, ort.get_available_providers())
sys.path.insert(0, "server")
from bundlerec_server.encoder import Encoder, CUDA
enc = Encoder(".gpuart/model/fp16.onnx", ".gpuart/model/tokenizer.json", provider="cuda")
assert enc.provider == CUDA, f"CUDA EP not in use: {enc.provider}"
import time
enc.warmup(10)
for bs in (1, 8, 32):
    texts = ["organic baby spinach"] * bs
    t = time.perf_counter()
    for _ in range(50): enc.encode(texts)
    print(f"fp16 CUDA batch {bs}: {(time.perf_counter() - t) / 50 * 1000:.2f} ms")
PY
PORT=50099
python3 -m bundlerec_server --artifact .gpuart --no-verify-checksums --provider cuda --host 127.0.0.1 --port $PORT \
  --encode-workers 4 --max-batch 32 --max-in-flight 256 --max-queue 512 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
python3 -m benchmarks.load --target 127.0.0.1:$PORT --sweep --rates 500,1000,2000,3000,4000 --duration 8 \
  --p99-bound-ms 5 --procs 8 --json "$OUT/gpu_sweep.json" --plot "$OUT/gpu_sweep.png"
grep -E "CUDA|provider|serving" "$OUT/server.log" | head -5
