"""Query spelling correction against the catalog's own vocabulary (for the lexical channel).

A query word unknown to the catalog titles (alphabetic, long enough) is replaced by the most frequent catalog
word within a small edit distance (1 for 4-7 letters, 2 from 8; rapidfuzz OSA), or split in two catalog words
when it is a run-together compound ("deckover" -> "deck over"). Known words, numbers and sizes are kept; at
most ``max_lookups`` unknown words of one query are looked up.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable

logger = logging.getLogger(__name__)

WORD = re.compile(r"(?u)\b\w\w+\b")


class SpellCorrector:
    def __init__(self, titles: Iterable[str], min_len: int = 4, min_df: int = 2, max_lookups: int = 8, max_len: int = 30) -> None:
        df: Counter[str] = Counter()
        for title in titles:
            df.update(set(WORD.findall(title.lower())))
        self.df = df
        self.min_len = min_len
        # a query of many unknown words must not cost many vocabulary scans (docs/server-notes.md)
        self.max_lookups = max_lookups
        self.max_len = max_len
        # candidates: frequent enough alphabetic words (rare title words are often typos themselves), most frequent
        # first: rapidfuzz keeps the first of equal scores when it cuts at ``limit``, so this order (not the set
        # iteration order, which string hashing makes differ between processes) decides, the same in every process
        self._choices = sorted((w for w, n in df.items() if n >= min_df and w.isalpha()), key=lambda w: (-df[w], w))
        self._cache: dict[str, str] = {}
        self._bind()

    def _bind(self) -> None:
        from rapidfuzz import process  # at load, so a missing library fails the load, not a request
        from rapidfuzz.distance import OSA

        self._extract, self._distance = process.extract, OSA.distance

    def __getstate__(self) -> dict[str, object]:
        """Picklable (built in a child process on a hot reload): rapidfuzz's functions are bound again on arrival."""
        state = self.__dict__.copy()
        del state["_extract"], state["_distance"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._bind()

    def max_distance(self, word: str) -> int:
        return 1 if len(word) < 8 else 2

    def _needs_lookup(self, word: str) -> bool:
        return (word not in self.df and self.min_len <= len(word) <= self.max_len and word.isalpha()
                and word not in self._cache)

    def correct_word(self, word: str) -> str:
        """The word itself when known or not correctable; otherwise its correction (possibly two words)."""
        if not self._needs_lookup(word):
            return self._cache.get(word, word)
        best = word
        found = self._extract(word, self._choices, scorer=self._distance, score_cutoff=self.max_distance(word), limit=20)
        if found:
            best = min(found, key=lambda f: (f[1], -self.df[f[0]], f[0]))[0]
        else:
            splits = [
                (min(self.df[word[:i]], self.df[word[i:]]), word[:i] + " " + word[i:])
                for i in range(3, len(word) - 2)
                if self.df.get(word[:i], 0) >= 2 and self.df.get(word[i:], 0) >= 2
            ]
            if splits:
                best = max(splits)[1]
        if len(self._cache) < 100_000:
            self._cache[word] = best
        return best

    def correct(self, query: str) -> str:
        """``query`` lower-cased with unknown words corrected in place (everything between words, such as the
        "1/2" of "1/2 in.", is kept); the query unchanged when nothing was corrected."""
        changed, lookups = False, 0

        def fix(match: re.Match[str]) -> str:
            nonlocal changed, lookups
            word = match.group(0)
            if self._needs_lookup(word):
                if lookups >= self.max_lookups:
                    return word
                lookups += 1
            fixed = self.correct_word(word)
            changed |= fixed != word
            return fixed

        out = WORD.sub(fix, query.lower())
        return out if changed else query
