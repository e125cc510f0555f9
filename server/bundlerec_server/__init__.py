"""bundlerec inference server: ONNX Runtime encoder, HNSW retrieval, complement bundling, grpc.aio."""

__version__ = "0.1.0"
