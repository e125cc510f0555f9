"""The learned (LambdaRank) complements end to end: built into the tiny artifact, loaded, served by Recommend."""

from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np

from bundlerec_server.artifact import COMPLEMENTS, Complements, ItemTable


def test_tiny_artifact_carries_the_learned_list_and_its_model(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    comp = m["complements"]
    assert comp["method"] == "lambdarank" and comp["model_file"] in m["files"]
    booster = lgb.Booster(model_file=str(tiny_artifact / comp["model_file"]))
    assert booster.feature_name() == comp["features"]
    assert comp["label_baskets"] > 0 and comp["validation"]["best_iteration"] >= 1
    lists = Complements.read(tiny_artifact / COMPLEMENTS)
    items = ItemTable.read(tiny_artifact / "items.jsonl")
    assert comp["anchors"] == len(items) == int(np.count_nonzero(np.diff(lists.indptr)))  # every item has a list
    for row in range(len(items)):
        rows, strength, _ = lists.of(row)
        assert np.all(np.diff(strength) <= 1e-7)  # stored best first
        assert all(items.categories[r] != items.categories[row] for r in rows.tolist())  # other aisles only


def _expected(lists: Complements, cats: list[str], anchor: int, n: int, min_strength: float) -> list[int]:
    """The served rule: the stored order, other categories, strength >= min_strength, else the best one."""
    rows, strength, _ = lists.of(anchor)
    ok = [r for r in rows.tolist() if cats[r] != cats[anchor]]
    strong = [r for r, s in zip(rows.tolist(), strength.tolist(), strict=True) if cats[r] != cats[anchor] and s >= min_strength]
    return strong[:n] if strong else ok[:1]


def test_served_recommend_complements_follow_the_learned_list(client, server, tiny_artifact):
    lists = Complements.read(tiny_artifact / COMPLEMENTS)
    items = ItemTable.read(tiny_artifact / "items.jsonl")
    row_of = {item_id: i for i, item_id in enumerate(items.ids)}
    min_strength = server.settings.min_complement_strength
    checked = 0
    for query in ("soda", "milk", "organic bananas", "yogurt", "chips"):
        for b in client.recommend(query, max_bundles=5, max_items_per_bundle=3):
            anchor = row_of[b.items[0].item_id]
            got = [row_of[i.item_id] for i in b.items[1:]]
            assert got, "a bundle holds at least one complement"
            assert got == _expected(lists, items.categories, anchor, 2, min_strength)
            checked += 1
    assert checked >= 5


def test_served_history_puts_the_shoppers_item_first_and_says_so(client, server, tiny_artifact):
    from bundlerec_server.bundling import PERSONAL_REASON

    items = ItemTable.read(tiny_artifact / "items.jsonl")
    row_of = {item_id: i for i, item_id in enumerate(items.ids)}
    habit = max(range(len(items)), key=lambda r: (items.orders[r], -r))  # the most ordered item
    bundles = list(client.recommend("soda", max_bundles=5, max_items_per_bundle=3,
                                    recent_item_ids=[items.ids[habit]] * 3))
    other = [b for b in bundles if items.categories[row_of[b.items[0].item_id]] != items.categories[habit]]
    assert other
    for b in other:
        assert b.items[1].item_id == items.ids[habit] and b.reason.startswith(PERSONAL_REASON)


def test_orders_without_shopper_ids_fall_back_to_npmi_with_a_log_line(tmp_path, caplog):
    from bundlerec_export.build import BuildConfig, _learned_complements
    from bundlerec_export.datasets import Basket, Dataset, Item

    items = [Item(str(i), f"item {i}", f"aisle {i % 3}") for i in range(6)]
    baskets = [Basket(str(b), "", [str(b % 6), str((b + 1) % 6)]) for b in range(30)]
    ds = Dataset("csv", items, baskets)
    cfg = BuildConfig(dataset="csv", out=tmp_path / "out", progress=False)
    with caplog.at_level("WARNING", logger="bundlerec_export.build"):
        assert _learned_complements(tmp_path, ds, [[int(i) for i in b.items] for b in baskets],
                                    [it.category for it in items], cfg) is None
    assert "falling back to NPMI" in caplog.text and not (tmp_path / "complements_model.txt").exists()


def test_complements_method_is_a_build_option(tmp_path):
    import pytest

    from bundlerec_export.build import BuildConfig
    from bundlerec_export.cli import _parser, config_from_args

    assert BuildConfig(dataset="instacart", out=tmp_path).complements == "learned"
    with pytest.raises(ValueError):
        BuildConfig(dataset="instacart", out=tmp_path, complements="magic")
    args = _parser().parse_args(["--dataset", "instacart", "--data-dir", str(tmp_path), "--out", str(tmp_path / "a"),
                                 "--complements", "npmi"])
    assert config_from_args(args, None).complements == "npmi"
