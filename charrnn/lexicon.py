"""The words a model read in its corpus, and a speller that keeps sampling to them (`sample --words known`).

A character model draws one character at a time, so a model that has not yet learnt to spell writes
words that are almost words ("fhim", "alought"). A run counts the words of its corpus once and keeps
those it read often enough in its checkpoint (`Lexicon`); at sampling time a `Speller` walks a
prefix tree of them beside each sample and, at every step, rules out the characters that would
leave it: a letter that no known word continues with, or a space, punctuation or digit while the
word so far is not a whole known word. Everything else, including how likely each allowed
character is, stays the model's. A prefix tree has no dead ends (every prefix of a word continues
to the end of one), so a sample can always go on.

A word here is a run of letters, with apostrophes inside it ("don't"); every other character (a
space, a digit, a hyphen, punctuation) ends one, so "well-made" is two words. Case is free ("The"
and "THE" spell "the").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch

APOSTROPHES = "'\u2019"  # may continue a word ("don't") when a known word goes on that way
# A known word occurs at least once per this many corpus characters, and at least MIN_COUNT times: a
# word seen once or twice may be a typo, and on a big corpus rare words are mostly names and typos
# (measured on the review corpus, docs/sampling.md "Known words": 3 -> 0.88 real words, 10 -> 0.95).
CHARS_PER_COUNT = 1_000_000
MIN_COUNT = 3
MAX_WORDS = 30_000  # the most frequent ones; keeps the tree and the checkpoint small
MAX_CHARS = 20_000_000  # words are counted over at most this many characters of the corpus


# a word: letters, with apostrophes inside ("don't"); anything else (space, digit, hyphen, punctuation) ends it
WORD = re.compile(r"[^\W\d_]+(?:[%s][^\W\d_]+)*" % APOSTROPHES)


def words(text: str) -> list[str]:
    """The words of `text`, lowercased, in order (see the module docstring)."""
    return WORD.findall(text.lower())


@dataclass(frozen=True)
class Lexicon:
    """Known words, most frequent first, and the count each needed."""

    words: tuple[str, ...]
    min_count: int
    _trees: dict = field(default_factory=dict, compare=False, repr=False)  # vocab chars -> compiled _Tree

    @classmethod
    def count(cls, texts: Iterable[str]) -> "Lexicon":
        """The lexicon of a corpus given as text pieces (read up to MAX_CHARS characters)."""
        counts: Counter = Counter()
        seen = 0
        for text in texts:
            text = text[: MAX_CHARS - seen]
            counts.update(words(text))
            seen += len(text)
            if seen >= MAX_CHARS:
                break
        need = max(MIN_COUNT, math.ceil(seen / CHARS_PER_COUNT))
        common = [w for w, n in counts.most_common() if n >= need][:MAX_WORDS]
        return cls(tuple(common), need)

    def merged(self, other: "Lexicon | None") -> "Lexicon":
        """This lexicon and another's words (fine-tuning keeps the words the model read before)."""
        if other is None:
            return self
        mine = set(self.words)
        extra = tuple(w for w in other.words if w not in mine)
        return Lexicon((self.words + extra)[:MAX_WORDS], min(self.min_count, other.min_count))

    def to_record(self) -> dict:
        return {"min_count": self.min_count, "words": " ".join(self.words)}

    @classmethod
    def from_record(cls, rec) -> "Lexicon | None":
        """The lexicon a checkpoint keeps, or None (a checkpoint from before lexicons, or a malformed entry)."""
        if not isinstance(rec, dict) or not isinstance(rec.get("words"), str) or not isinstance(rec.get("min_count"), int):
            return None
        return cls(tuple(w for w in rec["words"].split(" ") if w), rec["min_count"])

    def tree(self, chars: str) -> "_Tree":
        """The prefix tree over a vocabulary, built once per vocabulary."""
        if chars not in self._trees:
            self._trees[chars] = _Tree(self.words, chars)
        return self._trees[chars]


class _Tree:
    """The prefix tree as two tables over a vocabulary: `blocked[node]` (V,) which characters may not come
    next, and `next_flat[node * V + c]` the node after character c. Node 0 is between words; FREE is inside a
    word the tree does not know (from the prime), where everything is allowed until the word ends;
    QUOTE is just after a quote that closed a word."""

    def __init__(self, lexicon: Iterable[str], chars: str):
        words = set(lexicon)
        # the nodes are the words' prefixes, node 0 the empty one; each is its parent plus one character
        prefixes = [""] + sorted({w[:i] for w in words for i in range(1, len(w) + 1)})
        n = len(prefixes)
        free, quote = n, n + 1
        kind = [_kind(ch) for ch in chars]  # per column: its lowercase letter, an apostrophe, or None (a boundary)
        letter = torch.tensor([k is not None and k not in APOSTROPHES for k in kind])
        apostrophe = torch.tensor([k is not None and k in APOSTROPHES for k in kind])
        done = torch.tensor([True] + [p in words for p in prefixes[1:]] + [True, True])
        # A boundary may come where a word is complete, and leads between words. So may an apostrophe no
        # word continues with: a closing quote after a word (then a letter may not follow at once, or the
        # two would read as one word, "cat'dog"), an opening quote between words. A letter no word
        # continues with is ruled out; the prime (the only way to read one) leads into FREE.
        allowed = done[:, None] & ~letter[None, :]
        allowed[free] = True
        allowed[quote] = ~letter
        nxt = torch.where(letter, free, 0).to(torch.int32).repeat(n + 2, 1)
        nxt[1:n, apostrophe] = quote
        # the edges, per kind of character, then spread over the vocabulary's columns of that kind
        kinds = sorted({k for k in kind if k is not None})
        if kinds:
            slot = {k: i for i, k in enumerate(kinds)}
            parent, via, node = _edges(prefixes, slot)
            child = torch.full((n + 2, len(kinds)), -1, dtype=torch.int32)
            if node:
                child[torch.tensor(parent), torch.tensor(via)] = torch.tensor(node, dtype=torch.int32)
            cols = torch.tensor([j for j, k in enumerate(kind) if k is not None])
            of_col = child[:, torch.tensor([slot[kind[j]] for j in cols.tolist()])]  # (n + 2, columns with a kind)
            has = of_col >= 0
            allowed[:, cols] |= has
            nxt[:, cols] = torch.where(has, of_col, nxt[:, cols])
        allowed[~allowed.any(dim=1)] = True  # a node nothing leaves (the vocabulary lacks a letter): no constraint
        # what each sampling step reads: the characters ruled out, and the next node by node * V + character
        self.blocked, self.next_flat, self.width, self.free = ~allowed, nxt.view(-1), len(chars), free

    @property
    def allowed(self) -> torch.Tensor:
        """(nodes, V): which characters may come next at each node."""
        return ~self.blocked


def _edges(prefixes: list[str], slot: dict[str, int]) -> tuple[list[int], list[int], list[int]]:
    """The tree's edges as three lists (parent node, slot of its character, child node), for the sorted
    prefixes. Sorted order visits the tree depth first, so a prefix's parent is the last one seen a character
    shorter. Plain int lists, not tuples: the garbage collector tracks no ints, and collecting while tens of
    thousands of tuples are made cost 0.09 s, half of a speller's first tree (docs/speed.md, "First character")."""
    parent, via, node = [], [], []
    last = [0] * (max(map(len, prefixes)) + 1)
    for i in range(1, len(prefixes)):
        p = prefixes[i]
        last[len(p)] = i
        if p[-1] in slot:
            parent.append(last[len(p) - 1])
            via.append(slot[p[-1]])
            node.append(i)
    return parent, via, node


def _kind(ch: str) -> str | None:
    """What a vocabulary character is to the tree: its lowercase letter, an apostrophe, or None (a boundary)."""
    low = ch.lower()
    return low if len(low) == 1 and (low.isalpha() or low in APOSTROPHES) else None


class Speller:
    """Where each of n samples stands in the tree; restricts their logits and follows their characters."""

    def __init__(self, lexicon: Lexicon, chars: str, n: int):
        self.tree = lexicon.tree(chars)
        self.node = torch.zeros(n, dtype=torch.long)  # every sample starts between words

    def feed(self, ids: torch.Tensor) -> None:
        """Follow characters (n,) the samples read or drew."""
        flat = self.node.mul_(self.tree.width).add_(ids.cpu())
        self.node = self.tree.next_flat.index_select(0, flat).long()

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (k * n, V) with the characters that would misspell set to -inf; rows i, n + i, ...
        read the same text (a guided sample's shadow rows)."""
        blocked = self.tree.blocked.index_select(0, self.node)  # (n, V)
        if logits.shape[0] != blocked.shape[0]:
            blocked = blocked.repeat(logits.shape[0] // blocked.shape[0], 1)
        return logits.masked_fill(blocked.to(logits.device), float("-inf"))
