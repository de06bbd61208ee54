"""Fluency measures for generated text: the share of real words, and the share of distinct word 5-grams.

A word is a whitespace-separated token, lowercased, with punctuation stripped from both ends
("Movie," -> "movie"; a token of punctuation alone is no word). A real word is one that occurs at
least `min_count` (5) times in a reference text the model never trained on, so a misspelling or
character soup ("Kúèáq\\žÁ") is not one, and a rare real word may not be either: the share of real
words in real held-out reviews is the yardstick (about 0.95), not 1.
"""

from __future__ import annotations

import string
from collections import Counter
from typing import Iterable

# ASCII punctuation and the typographic quotes, dashes and ellipsis reviews use
PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00ab\u00bb"
MIN_COUNT = 5  # a real word occurs at least this often in the reference text


def words(text: str) -> list[str]:
    """The words of `text` (see the module docstring), in order."""
    out = []
    for token in text.lower().split():
        w = token.strip(PUNCTUATION)
        if w:
            out.append(w)
    return out


def real_words(texts: Iterable[str], min_count: int = MIN_COUNT) -> set[str]:
    """The words that occur at least `min_count` times in `texts` together."""
    counts = Counter(w for t in texts for w in words(t))
    return {w for w, n in counts.items() if n >= min_count}


def real_word_share(texts: Iterable[str], vocabulary: set[str]) -> float:
    """Of all the words in `texts`, the share found in `vocabulary` (0 when there are no words)."""
    ws = [w for t in texts for w in words(t)]
    return sum(w in vocabulary for w in ws) / len(ws) if ws else 0.0


def distinct_ngram_share(texts: Iterable[str], n: int = 5) -> float:
    """Distinct word n-grams over all word n-grams of `texts` (n-grams do not cross texts); 1 = no
    n-gram repeats, low = the texts repeat themselves or each other. 0 when no text has n words."""
    grams = [tuple(ws[i : i + n]) for t in texts for ws in (words(t),) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
