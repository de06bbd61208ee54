"""`neuron score`: the sentiment unit's final value and P(positive) for each text of a file.

The texts are each line of a plain text file (blank lines skipped), or each text of a labeled TSV
(then accuracy too). A text runs from the zero state as `neuron find` ran it (charrnn.neuron.states),
batched by length; P(positive) comes from the logistic fit on the unit's raw final value that
`neuron find` and bound runs store in the unit record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from charrnn.data import Vocab, is_labeled, iter_text, read_labeled
from charrnn.errors import DataError
from charrnn.neuron.find import p_positive
from charrnn.neuron.states import final_states
from charrnn.neuron.steer import check_unit

CHUNK = 2048  # texts whose states are held at once; memory stays flat however long the file


@dataclass
class Scores:
    """One entry per text, in file order."""

    texts: list[str]  # as scored (characters the model never saw removed)
    lines: list[int]  # each text's line number in the file (1-based)
    values: torch.Tensor  # (N,) the unit's value after the text's last character
    p_positive: torch.Tensor | None  # (N,) under the record's logistic fit; None when the record has none
    labels: list[int] | None  # 0/1, from a labeled TSV
    unknown: str = ""  # characters the model never saw, removed from the texts

    @property
    def accuracy(self) -> float | None:
        if self.labels is None or self.p_positive is None or not self.labels:
            return None
        return float(((self.p_positive > 0.5).long() == torch.tensor(self.labels)).double().mean())

    def rows(self) -> list[dict]:
        """One JSON-ready dict per text: line, value, p_positive, (label, correct,) text."""
        out = []
        for i, (t, n) in enumerate(zip(self.texts, self.lines)):
            row = {"line": n, "value": float(self.values[i]),
                   "p_positive": None if self.p_positive is None else float(self.p_positive[i])}
            if self.labels is not None:
                row["label"] = self.labels[i]
                row["correct"] = None if self.p_positive is None else bool((row["p_positive"] > 0.5) == (self.labels[i] == 1))
            row["text"] = t
            out.append(row)
        return out


def read_texts(path: Path) -> tuple[list[str], list[int], list[int] | None]:
    """(texts, their line numbers, labels or None) of a plain text file (one text per non-blank line)
    or a labeled TSV (its rows, checked by read_labeled)."""
    path = Path(path)
    labeled = is_labeled(path)
    lab = read_labeled(path) if labeled else None
    lines = "".join(iter_text(path)).split("\n")
    skip = 1 if labeled else 0  # the header
    kept = [(n, line.rstrip("\r")) for n, line in enumerate(lines[skip:], start=skip + 1)
            if (line.rstrip("\r") if labeled else line.strip())]  # the rows read_labeled keeps
    if lab is not None:
        return lab.texts, [n for n, _ in kept], lab.labels
    if not kept:
        raise DataError(f"{path}: no text to score (every line is blank)")
    return [t for _, t in kept], [n for n, _ in kept], None


def unit_values(model, vocab: Vocab, texts: list[str], rec: dict) -> torch.Tensor:
    """(N,) the record's unit after each text's last character (c for a bound 'c+h' unit, as find reads it)."""
    state, layer, unit = rec["state"].split("+")[0], rec["layer"], rec["unit"]
    check_unit(model, unit, state, layer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # like lengths batch together
    out = torch.empty(len(texts))
    for c0 in range(0, len(order), CHUNK):
        rows = order[c0 : c0 + CHUNK]
        states = final_states(model, vocab, [texts[i] for i in rows])[state]  # (n, layers, H)
        out[torch.tensor(rows)] = states[:, layer, unit]
    return out


def score_file(model, vocab: Vocab, rec: dict, path: Path,
               on_warn: Callable[[str], None] | None = None) -> Scores:
    """`neuron score`: every text of `path` through the model; `rec` is the checkpoint's unit record."""
    texts, lines, labels = read_texts(path)
    known = set(vocab.chars)
    unknown = "".join(dict.fromkeys(c for t in texts for c in t if c not in known))
    if unknown:
        texts = ["".join(c for c in t if c in known) for t in texts]
        if on_warn is not None:
            on_warn(f"{path}: characters the model never saw were skipped: {unknown[:20]!r}")
    values = unit_values(model, vocab, texts, rec)
    fit = rec.get("logistic")
    p = p_positive(fit, values) if isinstance(fit, dict) and "slope" in fit else None
    return Scores(texts, lines, values, p, labels, unknown)
