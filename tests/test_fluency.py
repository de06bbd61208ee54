"""benchmarks/fluency.py: real-word share and distinct 5-grams on made-up texts, counted by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from fluency import distinct_ngram_share, real_word_share, real_words, words  # noqa: E402


def test_words_are_lowercased_tokens_without_outer_punctuation():
    assert words('The film, "Superb"! ... don\'t (see) it\u2026 5/10') == ["the", "film", "superb", "don't", "see", "it", "5/10"]


def test_real_words_occur_at_least_five_times_in_the_reference():
    reference = ["the film was good.", "The film was good!", "the film was good", "THE FILM was good;",
                 "the film: good, bad."]  # the x5, film x5, good x5, was x4, bad x1
    assert real_words(reference) == {"the", "film", "good"}
    assert real_words(reference, min_count=4) == {"the", "film", "good", "was"}


def test_real_word_share_counts_every_word_of_every_text():
    vocabulary = {"the", "film", "good"}
    texts = ["The film was good.", "Kúèáq\\žÁ the fiml", "..."]  # 7 words: the film good the are real
    assert real_word_share(texts, vocabulary) == pytest.approx(4 / 7)
    assert real_word_share(["!?"], vocabulary) == 0.0


def test_distinct_5grams_do_not_cross_texts():
    assert distinct_ngram_share(["a b c d e f"]) == 1.0  # 2 five-grams, both new
    assert distinct_ngram_share(["a b c d e", "A b c d e."]) == 0.5  # the same 5-gram twice
    assert distinct_ngram_share(["a b c d", "e f g h"]) == 0.0  # no text has 5 words
    assert distinct_ngram_share(["x y x y x y x"], n=2) == pytest.approx(2 / 6)
