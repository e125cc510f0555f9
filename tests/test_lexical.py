"""Lexical channel: spelling correction against the catalog's words, exact BM25 and word coverage of candidates."""

from __future__ import annotations

import numpy as np
import pytest

from bundlerec_server.spelling import SpellCorrector

TITLES = [
    "Briggs and Stratton Lawn Mower Blade", "Gas Lawn Mower 21 in.", "Toilet Seat in White", "Toilet Seat Elongated",
    "Cedar Fence Picket", "Cedar Fence Post", "Deck Stain Cedar", "Kohler Faucet in Chrome", "Kohler Toilet",
    "Milwaukee Drill Kit", "Milwaukee Impact Driver", "PVC Pipe 1/2 in.", "Copper Pipe Fitting", "Refrigerator Water Filter",
    "Refrigerator French Door", "Wood Deck Screws", "Drywall Screws", "Deck Over Coating",
]


@pytest.fixture(scope="module")
def speller():
    return SpellCorrector(TITLES)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("gas mowe", "gas mower"),  # one letter missing
        ("toliet seat", "toilet seat"),  # two letters swapped count as one edit
        ("ceadar fence", "cedar fence"),
        ("kholer faucet", "kohler faucet"),
        ("refridgerator filter", "refrigerator filter"),  # 12 letters: two edits allowed
        ("milwakee drill", "milwaukee drill"),
        ("deckscrews", "deck screws"),  # a run-together compound is split
        ("1/2 in. pvc pipr", "1/2 in. pvc pipe"),  # what lies between words stays
    ],
)
def test_unknown_words_are_corrected_to_catalog_words(speller, query, expected):
    assert speller.correct(query) == expected


@pytest.mark.parametrize("query", ["gas mower", "pvc 1/2 in", "Cedar Fence", "买一双好穿的鞋子", "xyzzyq", "mow", "2x4"])
def test_known_short_numeric_or_foreign_words_are_left_alone(speller, query):
    assert speller.correct(query) == query  # unchanged text (case kept) when nothing was corrected


def test_score_rows_matches_search_and_counts_coverage(tiny_artifact):
    from bundlerec_server.engine import Engine
    from bundlerec_server.settings import Settings

    engine = Engine(tiny_artifact, Settings(artifact=tiny_artifact, provider="cpu"))
    lexical = engine.lexical
    title = engine.catalog.titles[0]
    query = " ".join(title.lower().split()[:2]) + " zzzqqq"  # two catalog words and one that matches nothing
    rows, scores = lexical.search(query, 50)
    assert len(rows) and np.all(np.diff(scores) <= 0)  # best first
    candidates = np.unique(np.concatenate([rows, np.arange(5)]))
    bm25, coverage = lexical.score_rows(query, candidates)
    by_row = dict(zip(rows.tolist(), scores.tolist(), strict=True))
    for row, b in zip(candidates.tolist(), bm25.tolist(), strict=True):
        assert b == pytest.approx(by_row.get(row, 0.0), rel=1e-5)
    ids, n_words = lexical._query(query)
    assert n_words > len(ids)  # the nonsense word counts in the denominator
    assert np.all((coverage >= 0) & (coverage <= 1))
    assert np.all((coverage > 0) == (bm25 > 0))  # a title matching a query word is exactly one with a BM25 score


def test_lookups_per_query_are_bounded():
    speller = SpellCorrector(TITLES, max_lookups=2)
    query = "toliet ceadar kholer milwakee"
    assert speller.correct(query) == "toilet cedar kholer milwakee"  # two scans, then words pass unchanged
    assert speller.correct(query) == "toilet cedar kohler milwaukee"  # cached corrections cost no scan
