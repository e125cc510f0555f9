"""Milvus as the dense retrieval backend, against a real Milvus (Lite) server process on loopback
(``milvus_uri``, tests/milvus.py): publishing, overlap with the in-process hnswlib index, exact filters, an
alias swap under load with hot reload, and refusal at start."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SLICE, ServerThread, server_process, server_settings

from benchmarks.milvus_bench import exact_rows

K = 10
SWAP_LOOP_MAX_CALLS = 3_000  # the load loop's bound


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tiny_artifact, milvus_uri):
    """The tiny artifact published (alias bundlerec_current -> its collection)."""
    from bundlerec_export.milvus_publish import publish

    return publish(tiny_artifact, milvus_uri)


@pytest.fixture(scope="module")
def engines(tiny_artifact, milvus_uri, published):
    """The tiny artifact loaded twice: in-process hnswlib and Milvus."""
    from bundlerec_server.engine import Engine

    return Engine(tiny_artifact, server_settings(tiny_artifact)), Engine(
        tiny_artifact, server_settings(tiny_artifact, vector_backend=milvus_uri))


@pytest.fixture(scope="module")
def priced_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact with prices (Instacart has none): every third item unknown (null), the rest 0.5-20,
    under its own version (manifest rewritten with fresh checksums)."""
    from bundlerec_server import artifact as A

    root = tmp_path_factory.mktemp("priced") / "tiny-priced"
    shutil.copytree(tiny_artifact, root)
    rng = np.random.default_rng(7)
    lines = (root / A.ITEMS).read_text().splitlines()
    with open(root / A.ITEMS, "w") as fh:
        for i, line in enumerate(lines):
            row = json.loads(line)
            row["price"] = None if i % 3 == 0 else round(float(rng.uniform(0.5, 20.0)), 2)
            fh.write(json.dumps(row) + "\n")
    manifest = A.read_manifest(root, verify=False)
    manifest["artifact_version"] += "-priced"
    A.write_manifest(root, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
    return root


@pytest.fixture(scope="module")
def tiny_v2(artifact_root, milvus_uri):
    """A second version: another random tiny BERT (seed 1), so its results differ from v1's; published by the
    build's --publish-milvus step under a staging alias (the serving alias still points at v1)."""
    from bundlerec_export.build import BuildConfig, build_artifact
    from bundlerec_export.tiny import make_tiny_bert

    model = make_tiny_bert(artifact_root / "tiny-bert-seed1", seed=1)
    return build_artifact(BuildConfig(
        dataset="instacart", data_dir=SLICE, out=artifact_root / "tiny-v2", base_model=model, min_int8_cosine=0.9,
        agreement_sample=64, min_support=2, progress=False, publish_milvus=f"{milvus_uri}?alias=bundlerec_staging"))


def _queries(engine, n: int = 60) -> tuple[list[str], np.ndarray]:
    titles = engine.catalog.titles[:: max(1, len(engine.catalog) // n)][:n]
    return titles, engine.encoder.encode(titles)


# --- unit: the filter expression -----------------------------------------------------------------------------


def test_filter_expression_mirrors_rowfilter(tiny_artifact):
    from bundlerec_server.artifact import ItemTable
    from bundlerec_server.catalog import Catalog
    from bundlerec_server.domain import Filters
    from bundlerec_server.filters import RowFilter
    from bundlerec_server.vectors import milvus_expr

    catalog = Catalog.from_table(ItemTable.read(tiny_artifact / "items.jsonl"))
    names = list(catalog.codes_by_name)
    assert milvus_expr(RowFilter.resolve(Filters(), catalog)) == ""
    f = Filters(include_categories=frozenset(names[:2]), exclude_categories=frozenset([names[2], "no such"]),
                max_price=4.5, exclude_ids=frozenset([catalog.ids[7], catalog.ids[3], "unknown"]))
    expr = milvus_expr(RowFilter.resolve(f, catalog))
    codes = sorted(catalog.codes_by_name[n] for n in names[:2])
    assert expr == (f"category in [{codes[0]},{codes[1]}] and category not in [{catalog.codes_by_name[names[2]]}] "
                    "and row not in [3,7] and (price is null or price <= 4.5)")


def test_backend_setting_is_checked():
    from bundlerec_server.settings import Settings

    assert Settings.load(["--vector-backend", "milvus://db.example:19530?alias=shop_live"]).vector_backend.startswith("milvus")
    for bad in ("milvus://nohost", "redis://h:1", "milvus://h:1?alias=1bad", "milvus://h:1?colour=red"):
        with pytest.raises(ValueError, match="vector backend"):
            Settings.load(["--vector-backend", bad])


# --- against Milvus Lite -------------------------------------------------------------------------------------


def test_publish_is_idempotent(tiny_artifact, milvus_uri, published):
    from bundlerec_export.milvus_publish import main, publish
    from bundlerec_server.vectors import MilvusTarget, collection_name

    assert published.rows == len(Path(tiny_artifact, "items.jsonl").read_text().splitlines())
    again = publish(tiny_artifact, milvus_uri)
    assert (again.collection, again.written) == (published.collection, False)  # complete: kept as it is
    assert main(["--artifact", str(tiny_artifact), "--uri", milvus_uri]) == 0
    client = MilvusTarget.parse(milvus_uri).client()
    try:
        version = json.loads(Path(tiny_artifact, "manifest.json").read_text())["artifact_version"]
        assert client.describe_alias("bundlerec_current")["collection_name"] == collection_name(version)
        assert client.query(published.collection, filter="", output_fields=["count(*)"])[0]["count(*)"] == published.rows
    finally:
        client.close()


def test_top10_overlap_with_hnswlib(engines):
    from bundlerec_server.domain import Filters

    local, remote = engines
    _, vecs = _queries(local)
    overlap = [len({h.row for h in local.dense(v, K, Filters())} & {h.row for h in remote.dense(v, K, Filters())}) / K
               for v in vecs]
    assert float(np.mean(overlap)) >= 0.95, overlap
    hit = remote.dense(vecs[0], K, Filters())[0]
    cosine = float(np.asarray(local.embeddings[hit.row]) @ vecs[0])
    assert hit.score == pytest.approx(cosine * float(local.catalog.quality[hit.row]), abs=1e-4)  # cosine x quality


@pytest.mark.parametrize("case", ["include", "exclude_categories", "exclude_ids", "max_price", "all"])
def test_filters_exact(case, priced_artifact, milvus_uri):
    from bundlerec_export.milvus_publish import publish
    from bundlerec_server.domain import Filters
    from bundlerec_server.engine import Engine

    publish(priced_artifact, f"{milvus_uri}?alias=bundlerec_priced")
    engine = Engine(priced_artifact, server_settings(priced_artifact, vector_backend=f"{milvus_uri}?alias=bundlerec_priced"))
    cat = engine.catalog
    biggest = [c for c, _ in sorted(engine.catalog.codes_by_name.items(),
                                    key=lambda kv: -int((cat.category_codes == kv[1]).sum()))]
    _, vecs = _queries(engine, 25)
    for vec in vecs:
        unfiltered = [cat.ids[h.row] for h in engine.dense(vec, K, Filters())]
        filters = {
            "include": Filters(include_categories=frozenset(biggest[:3])),
            "exclude_categories": Filters(exclude_categories=frozenset(biggest[:5])),
            "exclude_ids": Filters(exclude_ids=frozenset(unfiltered[:5])),
            "max_price": Filters(max_price=6.0),
            "all": Filters(include_categories=frozenset(biggest[:8]), exclude_categories=frozenset(biggest[:2]),
                           exclude_ids=frozenset(unfiltered[:3]), max_price=10.0),
        }[case]
        allowed = engine.allow(filters)
        hits = engine.dense(vec, K, allowed)
        rows = np.array([h.row for h in hits], dtype=np.int64)
        assert len(hits) == min(K, int(allowed.anchors(np.arange(len(cat))).sum()))
        assert allowed.anchors(rows).all()  # every hit passes every filter ...
        for h in hits:  # ... checked field by field, too
            assert cat.ids[h.row] not in filters.exclude_ids
            assert cat.category_lower[h.row] not in filters.exclude_categories
            assert not filters.include_categories or cat.category_lower[h.row] in filters.include_categories
            assert filters.max_price is None or np.isnan(cat.prices[h.row]) or cat.prices[h.row] <= filters.max_price
        assert set(rows.tolist()) == exact_rows(engine, vec, allowed)  # the same set as brute force
    if case == "max_price":  # unknown prices pass the cap, as in process
        assert np.isnan(cat.prices[[h.row for v in vecs for h in engine.dense(v, K, engine.allow(filters))]]).any()


def test_alias_swap_under_load_never_mixes_versions(tiny_artifact, tiny_v2, milvus_uri, published):
    """v1 serves from Milvus; a bounded load loop runs while v2 is published (alias repointed) and the server
    hot-reloads onto it: 0 errors, and every response's hits are exactly those of the version it names."""
    from bundlerec import Client
    from bundlerec.client import search_request
    from bundlerec_export.milvus_publish import main as publish_main

    v1 = json.loads(Path(tiny_artifact, "manifest.json").read_text())["artifact_version"]
    v2 = json.loads(Path(tiny_v2, "manifest.json").read_text())["artifact_version"]
    srv = ServerThread(server_settings(tiny_artifact, vector_backend=milvus_uri)).start()
    try:
        assert srv.call(srv.app.runtime.reload(tiny_v2)) is False  # the alias still points at v1: refused
        queries = ["organic milk", "banana", "sparkling water", "dark chocolate", "pasta sauce", "frozen pizza"]

        def ids_by_query(c: Client) -> dict[str, list[str]]:
            return {q: [h.item_id for h in c.search(q, K, retrieval_mode="dense")] for q in queries}

        calls: list[tuple[str, str, list[str]]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def loop(c: Client) -> None:
            i = 0
            while not stop.is_set() and i < SWAP_LOOP_MAX_CALLS:
                q = queries[i % len(queries)]
                try:
                    if i % 4 == 3:  # a Recommend stream now and then: its summary names the version
                        stream = c.recommend(q, max_bundles=3)
                        list(stream)
                        calls.append(("recommend", stream.summary.artifact_version, [q]))
                    else:
                        resp = c.stub.Search(search_request(q, K, "dense"), timeout=10)
                        calls.append((q, resp.artifact_version, [h.item_id for h in resp.hits]))
                except Exception as exc:  # counted, never raised in the loop
                    errors.append(exc)
                i += 1

        with Client(srv.target, timeout=10.0) as c:
            expected = {v1: ids_by_query(c)}
            worker = threading.Thread(target=loop, args=(c,))
            worker.start()
            time.sleep(1.0)
            assert publish_main(["--artifact", str(tiny_v2), "--uri", milvus_uri]) == 0  # repoints the alias
            time.sleep(1.0)  # v1 still serves, from its own collection, by name
            assert srv.call(srv.app.runtime.reload(tiny_v2)) is True
            time.sleep(1.5)
            stop.set()
            worker.join(60)
            expected[v2] = ids_by_query(c)
    finally:
        srv.stop()
    assert not errors, errors[:3]
    versions = [v for _, v, _ in calls]
    assert set(versions) == {v1, v2}
    assert versions.index(v2) > max(i for i, v in enumerate(versions) if v == v1)  # one switch, never back
    searches = [(q, v, ids) for q, v, ids in calls if q != "recommend"]
    assert expected[v1] != expected[v2]  # different encoders: a mixed call could not go unnoticed
    for q, v, ids in searches:
        assert ids == expected[v][q], (q, v)
    print(f"swap loop: {len(calls)} calls ({len(searches)} Search, {len(calls) - len(searches)} Recommend), "
          f"{len(errors)} errors, {versions.count(v1)} on v1 then {versions.count(v2)} on v2")


def test_refused_at_start(tiny_artifact, milvus_uri, published):
    from benchmarks.procs import free_port

    dead = f"milvus://127.0.0.1:{free_port()}"
    for backend, message in ((dead, "cannot reach Milvus"), (f"{milvus_uri}?alias=bundlerec_nowhere", "no alias")):
        proc = server_process(tiny_artifact, "--vector-backend", backend)
        try:
            assert proc.proc is not None
            code = proc.proc.wait(90)
        finally:
            proc.stop()
        assert code != 0 and message in proc.output(), proc.log_tail()
    proc = server_process(tiny_artifact, "--vector-backend", "milvus://nowhere")
    try:
        assert proc.proc is not None and proc.proc.wait(30) == 2 and "vector backend" in proc.output()
    finally:
        proc.stop()


def test_export_cli_takes_publish_milvus():
    from bundlerec_export.cli import _parser, config_from_args

    args = _parser().parse_args(["--dataset", "instacart", "--data-dir", str(SLICE), "--out", "x",
                                 "--publish-milvus", "milvus://127.0.0.1:19530?alias=shop"])
    cfg = config_from_args(args, None)
    assert cfg.publish_milvus == "milvus://127.0.0.1:19530?alias=shop"
    assert "publish_milvus" not in cfg.as_manifest()  # where it went is not part of the artifact
