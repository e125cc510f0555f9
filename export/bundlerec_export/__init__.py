"""bundlerec offline export: dataset -> versioned serving artifact (see ``bundlerec_server.artifact``).

Modules: ``config`` (``BuildConfig``, every build default), ``build`` (one function per stage, ``build`` /
``build_artifact``), ``datasets`` (adapters), ``finetune`` (bi-encoder fine-tuning), ``onnx_export`` (fp32 /
int8 / fp16 + agreement), ``pertoken`` (batch-exact int8), ``index_tuning`` (HNSW ef by recall),
``complements`` (co-occurrence, content-based fallback, item quality), ``tune`` (served retrieval mode chosen
on the dev split), ``evaluation`` (ranking metrics, query split, judgments reader), ``offline``
(``ensure_offline``), ``cli`` (``bundlerec-export``), ``tiny`` (a tiny random BERT for tests), ``sample``
(demo/test data). Design notes and measurements: ``docs/export-notes.md``.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
