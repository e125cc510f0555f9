#!/usr/bin/env bash
# Stages what benchmarks/gpu_check.sh needs on a GPU machine that has no network and takes at most 64 MiB a call.
#
# Run HERE (needs network to the package registry), from the repo root:  bash benchmarks/gpu_stage.sh [ARTIFACT]
# It writes .gpu/1 ... .gpu/N (each one part of one xz tarball, < 60 MiB; add "/.gpu/" to .git/info/exclude).
# The tarball holds: onnxruntime-gpu unpacked (CUDA 13 build; the TensorRT provider and the C-API library,
# which Python does not load, left out), the small pure/binary wheels the server needs unpacked, the hnswlib
# sdist (built there), the generated stubs and ARTIFACT with only its fp16 graph (manifest trimmed to match).
# Then, THERE, through the device tool, one call per part on the same warm machine:
#   parts 1..N-1: command "bash benchmarks/gpu_check.sh stage", carry [".gpu/K"]
#   part N:       command "bash benchmarks/gpu_check.sh",       carry [".gpu/N"]
set -euo pipefail
ART=${1:-artifacts/demo}
ORT_VERSION=${ORT_VERSION:-1.31.1}
STAGE=${STAGE:-/tmp/bundlerec-gpu-stage}
rm -rf "$STAGE" .gpu && mkdir -p "$STAGE/wheels" "$STAGE/payload/site" "$STAGE/payload/.gpuart/model" .gpu
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d $STAGE/wheels"
for pl in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  P="$P --platform $pl"
done
python3 -m pip download -q $P onnxruntime-gpu==$ORT_VERSION grpcio==1.85.3 protobuf==7.36.2 \
  grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1 googleapis-common-protos==1.76.0 \
  bm25s==0.3.16 PyStemmer==3.1.0 rapidfuzz==3.14.6
python3 -m pip download -q --no-deps --no-binary hnswlib -d "$STAGE/payload" hnswlib==0.8.0
for w in "$STAGE"/wheels/*.whl; do unzip -q -o "$w" -d "$STAGE/payload/site"; done  # a wheel is a zip: --target install
rm -f "$STAGE"/payload/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
      "$STAGE"/payload/site/onnxruntime/capi/libonnxruntime.so.*
make -s proto >/dev/null
mkdir -p "$STAGE/payload/client/bundlerec" && cp -r client/bundlerec/v1 "$STAGE/payload/client/bundlerec/"
for f in manifest.json items.jsonl embeddings.npy index.hnsw complements.npz lexical; do cp -r "$ART/$f" "$STAGE/payload/.gpuart/"; done
cp "$ART/model/fp16.onnx" "$ART/model/tokenizer.json" "$STAGE/payload/.gpuart/model/"
python3 - "$STAGE/payload/.gpuart/manifest.json" <<'PY'
import json, sys  # a partial copy: the manifest lists only what travels, so checksums stay verified there
path = sys.argv[1]
m = json.load(open(path))
m["models"] = {"fp16": m["models"]["fp16"]}
m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("model/") or k in ("model/fp16.onnx", "model/tokenizer.json")}
json.dump(m, open(path, "w"), indent=2)
PY
tar -C "$STAGE/payload" -cf - . | xz -T2 -6 > "$STAGE/payload.tar.xz"
split -b 58M -d -a 1 "$STAGE/payload.tar.xz" "$STAGE/part."
i=0
for part in "$STAGE"/part.*; do
  i=$((i + 1)); mkdir -p ".gpu/$i"; mv "$part" ".gpu/$i/"
done
ls -la .gpu/*
echo "staged $i parts ($(du -sh "$STAGE/payload.tar.xz" | cut -f1)) from $ART"
