"""A real Milvus for the tests (pytest plugin, registered in conftest.py): Milvus Lite's gRPC server as its own
process on a free loopback port (``python -m milvus_lite server``, see ``benchmarks.milvus_bench.MilvusLite``),
the same API a Milvus cluster serves.

``BUNDLEREC_TEST_MILVUS_URI`` (``milvus://host:port``) names a running Milvus instead. Tests are skipped only
when pymilvus or milvus-lite is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def milvus_uri() -> Iterator[str]:
    """``milvus://127.0.0.1:P`` of a Milvus serving for the whole session."""
    if os.environ.get("BUNDLEREC_TEST_MILVUS_URI"):
        yield os.environ["BUNDLEREC_TEST_MILVUS_URI"]
        return
    for module in ("pymilvus", "milvus_lite"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the Milvus backend tests need pymilvus and milvus-lite "
                        "(pip install pymilvus milvus-lite), or BUNDLEREC_TEST_MILVUS_URI naming a running Milvus")
    from benchmarks.milvus_bench import MilvusLite

    with MilvusLite() as server:
        yield server.uri
