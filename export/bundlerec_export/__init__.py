"""bundlerec offline export: dataset -> versioned serving artifact (see ``bundlerec_server.artifact``).

Modules: ``datasets`` (adapters), ``onnx_export`` (fp32/int8/fp16 + agreement), ``complements`` (NPMI
co-occurrence, content-based fallback, item quality), ``build`` (``BuildConfig`` / ``build_artifact``),
``cli`` (``bundlerec-export``), ``tiny`` (a tiny random BERT for tests), ``sample`` (demo/test data).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
