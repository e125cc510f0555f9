"""Features of the learned hybrid ranker, hand-computed on a tiny catalog."""

from __future__ import annotations

import numpy as np
import pytest

from bundlerec_export.build import build_lexical
from bundlerec_server.fusion import Candidates
from bundlerec_server.lexical import Lexical
from bundlerec_server.ranking_features import (
    FEATURES,
    MISSING_RANK,
    RowTokens,
    TitleFeatures,
    feature_matrix,
    trigrams_of,
    units_of,
)

TITLES = [
    "Husky 1/2 in. Drive Socket Set",
    "Milwaukee 3/4 in. Impact Wrench",
    "Husky 60 in. Tool Chest",
    "Glacier Bay Faucet",
    "Husky Mechanics Tool Set",
]


@pytest.fixture(scope="module")
def lexical(tmp_path_factory) -> Lexical:
    folder = tmp_path_factory.mktemp("lexical")
    params = build_lexical(TITLES, folder, 1.5, 0.75, progress=False)
    return Lexical(folder, params, TITLES)


def _features(lexical: Lexical, query: str) -> dict[str, np.ndarray]:
    rows = np.array([0, 1, 2], dtype=np.int64)
    bm25, coverage = lexical.score_rows(query, rows)
    c = Candidates(rows, np.array([0.5, 0.2, 0.8], np.float32), bm25, coverage, np.array([1.0, 0.9, 1.1], np.float32))
    x = feature_matrix(TitleFeatures(TITLES), lexical, query, c, np.array([2, 0]), np.array([0, 1]))
    assert x.shape == (3, len(FEATURES)) and x.dtype == np.float64
    return {name: x[:, j] for j, name in enumerate(FEATURES)}


def test_units_are_canonical():
    assert units_of('1/2 in. drive') == units_of('1/2" drive') == units_of("1/2-in drive") == {"1/2in"}
    assert units_of("1 1/2 in. pipe") == units_of("1-1/2 inch pipe") == {"1-1/2in"}
    assert units_of("60-Watt bulb, 5 gal. bucket, 2 sq. ft.") == {"60w", "5gal", "2sqft"}
    assert units_of("3/4 plywood") == frozenset()


def test_each_feature_by_hand(lexical):
    f = _features(lexical, 'Husky 1/2" socket')
    close = np.testing.assert_allclose
    close(f["cosine"], [0.5, 0.2, 0.8])
    close(f["cosine_scaled"], [0.5, 0.0, 1.0], atol=1e-6)
    close(f["cosine_gap"], [-0.3, -0.6, 0.0], atol=1e-6)
    assert f["bm25"][0] > f["bm25"][2] > 0 and f["bm25"][1] == 0  # husky+socket; husky; nothing
    close(f["bm25_scaled"], f["bm25"] / f["bm25"].max())
    close(f["bm25_raw"], f["bm25"])  # nothing to correct
    close(f["coverage_raw"], [1.0, 0.0, 1 / 3])  # husky, 1/2, socket
    close(f["all_words"], [1, 0, 0])
    close(f["numbers_matched"], [1, 0, 0])  # 1/2; 3/4 and 60 are other numbers
    close(f["units_matched"], [1, 0, 0])  # 1/2" == 1/2 in.; 3/4 in. is not
    close(f["brand_matched"], [1, 0, 1])  # husky starts 3 titles: a brand; the query names it
    close(f["phrase"], [0, 0, 0])
    close(f["bigrams"], [0.5, 0, 0])  # "husky 1/2" yes, "1/2 socket" no
    close(f["title_words"], [5, 4, 4])  # in. is a stopword
    close(f["quality"], [1.0, 0.9, 1.1])
    close(f["dense_rank"], [2, MISSING_RANK, 1])
    close(f["lexical_rank"], [1, 2, MISSING_RANK])
    close(f["in_both"], [1, 0, 0])
    close(f["query_words"], [3, 3, 3])
    close(f["query_numbers"], [1, 1, 1])
    close(f["query_units"], [1, 1, 1])
    close(f["query_brand"], [1, 1, 1])
    close(f["spelling_changed"], [0, 0, 0])
    # the query's BM25 words: husky (in 3 of the 5 titles), 1, 2 and socket (each in 1)
    husky, socket = np.log1p((5 - 3 + 0.5) / (3 + 0.5)), np.log1p((5 - 1 + 0.5) / (1 + 0.5))
    close(f["idf_coverage"], [1.0, 0.0, husky / (husky + 3 * socket)], rtol=1e-6)
    close(f["missing_idf"], [0.0, socket, socket], rtol=1e-6)
    close(f["query_max_idf"], [socket] * 3, rtol=1e-6)
    # "husky12socket": hus usk sky ky1 y12 12s 2so soc ock cke ket; "husky12indrivesocketset" has all but 12s and 2so
    close(f["trigram_recall"], [9 / 11, 0.0, 3 / 11], rtol=1e-6)


def test_phrase_and_spelling(lexical):
    f = _features(lexical, "tool chest")
    np.testing.assert_allclose(f["phrase"], [0, 0, 1])
    np.testing.assert_allclose(f["bigrams"], [0, 0, 1])
    np.testing.assert_allclose(f["query_brand"], [0, 0, 0])
    np.testing.assert_allclose(f["query_numbers"], [0, 0, 0])
    g = _features(lexical, "huskyy socket")  # a typo the speller corrects (served BM25) but the raw query keeps
    assert g["spelling_changed"][0] == 1
    assert g["bm25"][0] > g["bm25_raw"][0] > 0 and g["bm25_raw"][2] == 0 < g["bm25"][2]


def test_no_candidates(lexical):
    empty = np.zeros(0, dtype=np.int64)
    c = Candidates(empty, np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    assert feature_matrix(TitleFeatures(TITLES), lexical, "husky", c, empty, empty).shape == (0, len(FEATURES))


@pytest.mark.parametrize("query", ['Husky 1/2" socket', "tool chest", "huskyy socket"])
@pytest.mark.parametrize("keep", [[0], [1, 2], [0, 2], [0, 1, 2]])
def test_kept_rows_equal_the_full_matrix(lexical, query, keep):
    """Scoring a subset of the candidates (the learned ranker's prefilter) must not change any feature: set-level
    features (scaling, gap to the best, ranks) still see every candidate."""
    rows = np.array([0, 1, 2], dtype=np.int64)
    bm25, coverage = lexical.score_rows(query, rows)
    c = Candidates(rows, np.array([0.5, 0.2, 0.8], np.float32), bm25, coverage, np.array([1.0, 0.9, 1.1], np.float32))
    args = (TitleFeatures(TITLES), lexical, query, c, np.array([2, 0]), np.array([0, 1]))
    full = feature_matrix(*args)
    part = feature_matrix(*args, keep=np.array(keep, dtype=np.int64))
    np.testing.assert_array_equal(part, full[keep])


def test_row_tokens_fraction_equals_set_arithmetic():
    """The gathered count equals the share of the query's tokens found in each title's set, empty titles (first,
    middle, last, all) included, repeated and unknown query tokens counted in the denominator as written."""
    titles = ["", "Husky 1/2 in. Socket", "ab", "Husky socket set", "", "deck over stain", "x"]
    sets = [trigrams_of(t) for t in titles]
    table = RowTokens(sets)
    for query in ("husky socket", "deckover", "zzz", "husk"):
        q = trigrams_of(query)
        for rows in ([0, 1, 2, 3, 4, 5, 6], [4], [1, 4], [0, 6], [5, 6], [2, 3]):
            r = np.array(rows, dtype=np.int64)
            expected = [len(q & sets[i]) / len(q) if q else 0.0 for i in rows]
            np.testing.assert_allclose(table.fraction(q, r), expected, rtol=1e-6)
    assert table.fraction(frozenset(), np.array([1, 3])).tolist() == [0.0, 0.0]
    assert table.fraction(trigrams_of("husky"), np.zeros(0, dtype=np.int64)).shape == (0,)
