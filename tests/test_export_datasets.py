"""Dataset adapters: common form, errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundlerec_export.datasets import DatasetError, load_dataset

SLICE = Path(__file__).parent / "data" / "instacart_slice"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_instacart_slice_has_items_categories_and_baskets():
    ds = load_dataset("instacart", SLICE)
    assert 250 <= len(ds.items) <= 300
    assert all(it.category for it in ds.items)  # category = aisle
    assert all(it.price is None for it in ds.items)
    ids = {it.id for it in ds.items}
    assert ds.baskets and all(set(b.items) <= ids for b in ds.baskets)
    assert all(b.user_id for b in ds.baskets)
    assert [s.rows for s in ds.sources][0] == len(ds.items)
    assert all(len(s.sha256) == 64 for s in ds.sources)


def test_instacart_limit_restricts_baskets(tmp_path):
    ds = load_dataset("instacart", SLICE, limit=50)
    assert len(ds.items) == 50
    ids = {it.id for it in ds.items}
    assert all(set(b.items) <= ids for b in ds.baskets)
    assert ds.dropped_basket_lines > 0


def test_generic_csv_with_optional_columns_and_orders(tmp_path):
    cat = _write(tmp_path / "cat.csv", "id,title,category,price\na,Red apple,fruit,1.5\nb,Bread,bakery,\nc,,x,2\n")
    orders = _write(tmp_path / "orders.csv", "basket_id,item_id,user_id\n1,a,u1\n1,b,u1\n1,a,u1\n2,zzz,u2\n2,b,u2\n")
    ds = load_dataset("csv", catalog=cat, orders=orders)
    assert [(i.id, i.title, i.category, i.price) for i in ds.items] == [
        ("a", "Red apple", "fruit", 1.5), ("b", "Bread", "bakery", None)]
    assert ds.skipped_empty_title == 1
    assert [(b.basket_id, b.user_id, b.items) for b in ds.baskets] == [("1", "u1", ["a", "b"]), ("2", "u2", ["b"])]
    assert ds.dropped_basket_lines == 1


def test_generic_csv_minimal_columns(tmp_path):
    cat = _write(tmp_path / "cat.csv", "title,id\nHammer,1\nNails,2\n")
    ds = load_dataset("csv", catalog=cat)
    assert [(i.id, i.category, i.price) for i in ds.items] == [("1", "", None), ("2", "", None)]
    assert not ds.has_baskets


def test_generic_jsonl(tmp_path):
    rows = [{"id": 7, "title": "Lamp", "price": 9.95}, {"id": "8", "title": "Bulb", "category": "light"}]
    cat = _write(tmp_path / "cat.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_dataset("jsonl", catalog=cat)
    assert [(i.id, i.category, i.price) for i in ds.items] == [("7", "", 9.95), ("8", "light", None)]


@pytest.mark.parametrize(("name", "kind", "text", "message"), [
    ("cat.csv", "csv", "id,name\n1,Hammer\n", r"cat\.csv:1: missing column\(s\) title"),
    ("cat.csv", "csv", "id,title\n1,Hammer\n2,Saw\n1,Drill\n", r"cat\.csv:4: duplicate item id '1' \(first seen on line 2\)"),
    ("cat.jsonl", "jsonl", '{"id": "a", "title": "x"}\n{"id": "a", "title": "y"}\n', r"cat\.jsonl:2: duplicate item id 'a'"),
    ("bad.jsonl", "jsonl", '{"id": "a", "title": "x"}\n{not json}\n', r"bad\.jsonl:2: invalid JSON"),
    ("nokey.jsonl", "jsonl", '{"id": "a", "title": "x"}\n\n{"id": "b"}\n', r"nokey\.jsonl:3: missing key\(s\) title"),
    ("cat.csv", "csv", "id,title,price\n1,Hammer,3\n2,Saw,cheap\n", r"cat\.csv:3: price 'cheap'"),
    ("cat.csv", "csv", "id,title\n", r"cat\.csv: empty catalog"),
    ("blank.csv", "csv", "id,title\n1,  \n", r"blank\.csv: empty catalog"),
    ("empty.csv", "csv", "", r"empty\.csv:1: empty file"),
])
def test_catalog_errors_name_file_and_line(tmp_path, name, kind, text, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset(kind, catalog=_write(tmp_path / name, text))


def test_missing_files_and_columns_in_instacart(tmp_path):
    with pytest.raises(DatasetError, match="products.csv: file not found"):
        load_dataset("instacart", tmp_path)
    _write(tmp_path / "products.csv", "product_id,product_name,aisle,department\n1,Milk,milk,dairy\n")
    _write(tmp_path / "orders.csv", "order_id,user_id\n10,u\n")
    _write(tmp_path / "order_items.csv", "order_id,item\n10,1\n")
    with pytest.raises(DatasetError, match=r"order_items\.csv:1: missing column\(s\) product_id"):
        load_dataset("instacart", tmp_path)


def test_homedepot_and_icecat_layouts(tmp_path):
    hd = tmp_path / "hd"
    hd.mkdir()
    _write(hd / "products.csv", "product_id,title\n100001,Angle\n100002,Deck coating\n")
    ds = load_dataset("homedepot", hd)
    assert [i.id for i in ds.items] == ["100001", "100002"] and not ds.has_baskets
    ic = tmp_path / "ic"
    ic.mkdir()
    _write(ic / "products.jsonl", '{"id": "1", "title": "Toner", "description": "d", "brand": "X", "price": 49.95}\n')
    ds = load_dataset("icecat", ic)
    assert ds.items[0].price == 49.95 and ds.items[0].category == ""


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("nope", Path("."))


def test_cli_reports_dataset_error(tmp_path, capsys):
    from bundlerec_export.cli import main

    cat = _write(tmp_path / "cat.csv", "id,title\n1,Hammer\n1,Saw\n")
    out = tmp_path / "art"
    assert main(["--dataset", "csv", "--catalog", str(cat), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cat.csv:3: duplicate item id '1'" in err
    assert not out.exists()


def test_sample_is_deterministic(tmp_path):
    from bundlerec_export.sample import derive

    a = derive(SLICE, tmp_path / "a", orders=200, min_count=2, max_products=50, seed=3)
    b = derive(SLICE, tmp_path / "b", orders=200, min_count=2, max_products=50, seed=3)
    assert a == b and 0 < a["products"] <= 50
    for name in ("products.csv", "orders.csv", "order_items.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ds = load_dataset("instacart", tmp_path / "a")
    assert len(ds.items) == a["products"] and len(ds.baskets) == a["orders"]
