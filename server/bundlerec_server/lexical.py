"""BM25 over item titles (bm25s): query parsing, top-k search and exact scores for given rows."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .spelling import SpellCorrector


def sort_postings(index: dict[str, Any]) -> None:
    """bm25s keeps one posting list per word (CSC: indptr, indices = doc rows, data = scores); score_rows
    binary-searches them, so make sure each list is in ascending row order."""
    indptr, indices, data = index["indptr"], index["indices"], index["data"]
    word = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    if len(indices) and not np.all((np.diff(indices) > 0) | (np.diff(word) > 0)):
        order = np.lexsort((indices, word))
        index["indices"], index["data"] = indices[order], data[order]


def parse_query(tokenize: Callable[..., Any], speller: SpellCorrector | None, vocab: dict[str, int],
                options: dict[str, Any], text: str) -> tuple[list[int], int]:
    """The (spelling-corrected) query's distinct vocabulary ids and its number of distinct words."""
    words = tokenize([speller.correct(text) if speller is not None else text], show_progress=False,
                     return_ids=False, **options)[0]
    return sorted({vocab[w] for w in words if w in vocab}), len(set(words))


class Lexical:
    """BM25 over titles (bm25s), tokenised exactly as at export time (settings from the manifest)."""

    def __init__(self, folder: Path, params: dict[str, Any], titles: Sequence[str] | None = None,
                 speller: SpellCorrector | None = None) -> None:
        """``titles``: the catalog's, for the spelling corrector (None: no correction); ``speller``: that corrector
        built already (in a hot reload's child process)."""
        # bm25s probes JAX at import when it is installed; on a GPU host JAX would then take most of the GPU in
        # every worker (docs/server-notes.md). Scoring uses the score matrix with numpy, so keep any JAX on the CPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import bm25s

        self.retriever = bm25s.BM25.load(str(folder))
        sort_postings(self.retriever.scores)
        tok = params.get("tokenize", {})
        self.stopwords = tok.get("stopwords", "en")
        self.lower = bool(tok.get("lower", True))
        self.token_pattern = str(tok.get("token_pattern", r"(?u)\b\w\w+\b"))  # bm25s's default
        self.stemmer = None
        algorithm = (tok.get("stemmer") or {}).get("algorithm")
        if algorithm:
            import Stemmer

            self.stemmer = Stemmer.Stemmer(algorithm)
        n_docs = float(self.retriever.scores["num_docs"])
        df = np.diff(self.retriever.scores["indptr"]).astype(np.float64)
        self.idf = np.log1p((n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)  # per vocabulary id
        # typos: query words unknown to the catalog are corrected against the titles' own words (None = off)
        self.speller = speller if speller is not None else SpellCorrector(titles) if titles is not None else None
        # search and score_rows of one request (and repeated queries) tokenise once; per instance, so a reload
        # frees it. The cached function must not hold ``self`` (a cycle): the heap is frozen out of the cyclic
        # GC after a load, so an engine must be freed by reference counting alone.
        options = {"lower": self.lower, "stopwords": self.stopwords, "stemmer": self.stemmer, "token_pattern": self.token_pattern}
        self._query = functools.lru_cache(maxsize=4096)(functools.partial(
            parse_query, bm25s.tokenize, self.speller, self.retriever.vocab_dict, options))
        # the query as typed (no spelling correction): a feature of the learned ranker
        self._raw_query = functools.lru_cache(maxsize=4096)(functools.partial(
            parse_query, bm25s.tokenize, None, self.retriever.vocab_dict, options))

    def search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows by BM25 (score > 0), best first, ties by row."""
        ids, _ = self._query(text)
        if not ids or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores = self.retriever.get_scores_from_ids(ids)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        top = top[scores[top] > 0]
        return top.astype(np.int64), scores[top].astype(np.float32)

    def query_ids(self, text: str, corrected: bool = True) -> list[int]:
        """The query's distinct vocabulary ids, spelling-corrected or as typed."""
        return (self._query if corrected else self._raw_query)(text)[0]

    def score_rows(self, text: str, rows: np.ndarray, corrected: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Exact BM25 score of each of ``rows`` (ascending) and the fraction of the query's distinct words its
        title has: per query word, a binary search of ``rows`` in the word's posting list. ``corrected=False``
        scores the query as typed (no spelling correction)."""
        ids, n_words = (self._query if corrected else self._raw_query)(text)
        bm25 = np.zeros(len(rows), dtype=np.float32)
        matched = np.zeros(len(rows), dtype=np.float32)
        for t in ids:
            hit, scores = self._postings_hit(t, rows)
            if scores is not None:
                bm25[hit] += scores
                matched += hit
        return bm25, matched / max(n_words, 1)

    def _postings_hit(self, t: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Which of ``rows`` (ascending) have word ``t``, and their BM25 term scores (None: the word has no postings)."""
        index = self.retriever.scores
        lo, hi = int(index["indptr"][t]), int(index["indptr"][t + 1])
        if hi == lo:
            return np.zeros(len(rows), dtype=bool), None
        postings = index["indices"][lo:hi]
        at = np.minimum(np.searchsorted(postings, rows), hi - lo - 1)
        hit = postings[at] == rows
        return hit, index["data"][lo:hi][at[hit]]

    def idf_evidence(self, text: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-term evidence of the (spelling-corrected) query's catalog words for each of ``rows`` (ascending):
        the idf-weighted share of them the title has, the highest idf among those it lacks (0 when none), and
        the query's highest idf. idf = ln(1 + (N - df + 0.5) / (df + 0.5)), BM25's."""
        ids = self._query(text)[0]
        covered = np.zeros(len(rows), dtype=np.float32)
        missing = np.zeros(len(rows), dtype=np.float32)
        if not ids:
            return covered, missing, 0.0
        weights = self.idf[ids]
        for t, w in zip(ids, weights.tolist(), strict=True):
            hit = self._postings_hit(t, rows)[0]
            covered += w * hit
            np.maximum(missing, np.where(hit, 0.0, w), out=missing)
        return covered / float(weights.sum()), missing, float(weights.max())
