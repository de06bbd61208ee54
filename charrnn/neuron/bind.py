"""Binding (`train --sentiment-unit`): the training objective that ties unit BOUND_UNIT of the top layer to the labels.

The unit is the model's bound unit (ModelConfig.bound_unit): the rest of the network reads its h only
as a value written from outside, 0 unless something writes it (charrnn/model.py `Write`, or the hook
of `sample --sentiment`). Reviews are split (seeded) into:
- fixed reviews (`SentimentConfig.fixed` of them): at every character of one, the unit's h holds
  +-tanh(value) for its label: exactly what `sample --sentiment` holds it at (c = +-value,
  h = +-tanh(value)), so the rest of the network learns to write what the value says. The contrast
  (`contrast`, on `contrast_rows` streams of the batch) runs those characters a second time with the
  opposite value and asks their text to be likelier under its own label than under the other;
- free reviews and unlabeled text: h holds 0, "no label" (what free sampling and the validation loss
  see), while the unit's own cell state, which nothing else reads, learns to read the label under
  one of two reading losses (logistic, logit = LOGIT_SCALE * value / fixed value, on c; h for GRU/RNN):
  * `read` = 0 (the default): at every character of the free reviews in the streamed batch. Cheap,
    but it settles on the prior (0) wherever the label cannot be read yet (SST-2: 51%, measured);
  * `read` = N > 0: a reading pass instead: each step also runs N labeled texts of the training
    split (their last `read_chars` characters, each from the zero state, exactly as `neuron find`
    runs them), with the loss on the unit after the last character, where `neuron find` reads.
The LSTM, GRU and RNN train on the fused kernel throughout (the written value enters as an input
channel, or for the GRU through the bound unit itself; see `CharRNN._bound_top`); the custom cells
run their top layer step by step. Until this design the unit was fixed by a hook in fixed reviews
and ran free elsewhere, which kept the top layer off the fused kernel (a third of the plain speed)
and cost the language model (docs/research-log.md). The
checkpoint's unit record (`record()`) holds the fixed values as fix values, and the unit's recent
values where its reading loss looked (chunk ends of free reviews, or ends of reading texts), by label.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from charrnn.data import StreamBatcher, read_labeled, split
from charrnn.errors import DataError, UsageError
from charrnn.neuron.find import fit_logistic, fix_values_of
from charrnn.neuron.states import unit_at_ends
from charrnn.model import Write
from charrnn.neuron.steer import state_names

BOUND_UNIT = 0  # the top-layer unit that `train --sentiment-unit` binds
LOGIT_SCALE = 4.0  # reading losses: logit = LOGIT_SCALE * value / fixed value, so the fixed value reads as about 98% sure
OBSERVED_KEEP = 4096  # recent values per class that a binding keeps for its observed fix values


def reading_scale(model, value: float) -> float:
    """The reading losses' logit per unit of the bound unit's value: logit = scale * value, so the
    fixed value (c = value, or h = tanh(value) without a cell state) reads as about 98% sure."""
    return LOGIT_SCALE / (value if "c" in state_names(model) else math.tanh(value))


def text_spans(data: torch.Tensor, codes: torch.Tensor, nl: int) -> torch.Tensor:
    """(3, N): start, end (exclusive, the newline) and label of every labeled text in `data`, found
    from the newlines that end them (a labeled text holds no newline) and the codes of char_labels."""
    codes = codes[: len(data)]
    ends = ((data[: len(codes)] == nl) & (codes >= 0)).nonzero().squeeze(1)
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    keep = (ends > starts) & (codes[starts.clamp(max=max(len(codes) - 1, 0))] >= 0)
    starts, ends = starts[keep], ends[keep]
    return torch.stack([starts, ends, (codes[ends] % 2).long()])


def char_labels(paths, total: int, fixed_frac: float = 0.0, seed: int = 0) -> torch.Tensor:
    """One code per character of the training text, in load_corpus order: -1 outside labeled files,
    the label (0/1) in a free review, label + 2 in a review chosen (seeded, `fixed_frac` of them)
    to have its unit fixed."""
    from charrnn.data import is_labeled, iter_text

    parts = []
    g = torch.Generator().manual_seed(seed)
    for p in paths:
        p = Path(p)
        if is_labeled(p):
            lab = read_labeled(p)
            lens = torch.tensor([len(t) + 1 for t in lab.texts])  # each text and its newline
            codes = torch.tensor(lab.labels, dtype=torch.int8)
            codes += 2 * (torch.rand(len(codes), generator=g) < fixed_frac).to(torch.int8)
            parts.append(torch.repeat_interleave(codes, lens))
        else:
            n = sum(len(piece) for piece in iter_text(p))
            parts.append(torch.full((n,), -1, dtype=torch.int8))
    labels = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int8)
    if len(labels) != total:
        raise DataError(f"the labels cover {len(labels)} characters but the corpus has {total}; "
                        "the corpus files changed while reading them")
    if not (labels >= 0).any():
        raise UsageError("--sentiment-unit needs a labeled corpus: a TSV whose first line is 'label<TAB>text'")
    return labels


def contrast_weight(sc, step: int, total_steps: int) -> float:
    """The contrast's weight at `step` of `total_steps` (0: unknown, the full weight): off for the first
    `contrast_from` of the run, then rising linearly to `contrast` at twice that. Until the language
    model knows words the two passes barely differ (the loss sits at log 2) and the contrast's gradient,
    larger than the language model's, is noise (measured: 1.6x its norm at step 500 of a 15-minute run)."""
    if total_steps <= 0 or sc.contrast_from <= 0:
        return sc.contrast
    progress = step / total_steps
    return sc.contrast * min(1.0, max(0.0, (progress - sc.contrast_from) / sc.contrast_from))


class BoundObjective:
    """The training objective of a bound run (see the module docstring), behind the Trainer's objective
    interface: `before_step(step, carry, total_steps) -> carry`, `forward(net, x, y, carry) -> (language-model loss,
    objective, carry)` and `record() -> dict`, the checkpoint's unit record."""

    def __init__(self, model, cfg, corpus: list[Path], train_data: torch.Tensor, total_chars: int,
                 newline: int | None, previous: dict | None = None):
        """`cfg` is the run's TrainConfig, `train_data` the training split of the corpus (`total_chars`
        long with the validation split), `newline` its id, `previous` the unit record of the checkpoint
        the run starts from (a bound one carries on with its observed values)."""
        self.cfg, self.sc, self.model = cfg, cfg.sentiment, model
        codes = char_labels(corpus, total_chars, self.sc.fixed, cfg.seed)
        train_labels, _ = split(codes, cfg.val_frac)
        self.batcher = StreamBatcher(train_labels, cfg.batch_size, cfg.seq_len)
        self.names = state_names(model)
        self.state = "c+h" if "c" in self.names else "h"
        # reading losses: logit = scale * value (see reading_scale). The loss is on c, the state `neuron find`
        # reads: on h, the unit's output gate closed to dodge the loss while the labels were still
        # unreadable (measured: h of 0.001 at the end of every SST-2 sentence, 50% accuracy) and the
        # gradient died with it.
        self._scale = reading_scale(model, self.sc.value)
        self.top = model.config.layers - 1
        self.data, self.nl = train_data, newline
        self.spans = torch.empty(3, 0, dtype=torch.long)  # the reading pass's texts, found only when it runs
        if self.sc.read > 0 and newline is not None:
            self.spans = text_spans(train_data, train_labels, newline)
        self._labels = self._free = self._read = None  # the current step's codes, free rows, reading pass
        self._values = None  # (B, T) of the current step: the values written into the unit's h
        self._rows = self._other = None  # the contrast's streams, and its logits when the model ran them in the first pass
        self._contrast_weight = self.sc.contrast  # this step's (see contrast_weight)
        # the model holds the unit (ModelConfig.bound_unit); a run bound by an older charrnn, whose
        # checkpoint did not say so, goes on bound the same way
        model.config.bound_unit = BOUND_UNIT
        obs = (previous or {}).get("observed") if (previous or {}).get("source") == "bind" else None
        self.observed = {k: list(obs.get(k, [])) if obs else [] for k in ("positive", "negative")}

    # ------------------------------------------------------------ the objective interface

    def before_step(self, step: int, carry, total_steps: int = 0):
        lab, _, _ = self.batcher.get(step)  # (B, T) codes of the input characters
        self._contrast_weight = contrast_weight(self.sc, step, total_steps)
        self._labels = lab
        fixed = lab >= 2  # (B, T): characters of fixed reviews
        self._free = ~fixed[:, -1]
        sign = (lab % 2).to(carry[0].dtype).mul(2).sub(1)
        h = math.tanh(self.sc.value) if "c" in self.names else self.sc.value  # what sampling holds h at
        self._values = torch.where(fixed, sign * h, torch.zeros_like(sign)).to(carry[0].device)
        self._read = self._reading_batch(step)
        return carry

    def forward(self, net, x: torch.Tensor, y: torch.Tensor, carry):
        write = Write(self._values)
        if self._contrast_weight > 0:  # the contrast's second pass, in the same call where the model can share the layers below
            self._rows = write.rows = self._contrast_rows()
            write.other = -self._values[write.rows]
        logits, loss, out = net(x, y, carry, write=write)
        self._other = write.other_logits
        return loss, loss + self.extra_loss(write.read, x, y, carry, logits), out

    def _contrast_rows(self) -> torch.Tensor:
        """The streams the contrast runs on: the first `contrast_rows` of those inside a fixed review."""
        fixed = (self._labels >= 2).any(1).nonzero().squeeze(1)
        return fixed[: self.sc.contrast_rows].to(self._values.device)  # [:None]: all

    def record(self) -> dict:
        """The checkpoint's unit record: the fix values of a bound unit are the values training fixed
        (what the network learned to read); the observed 10th/90th percentiles of the free unit are
        kept beside them."""
        pos, neg = self.observed["positive"], self.observed["negative"]
        v = self.sc.value if "c" in self.names else math.tanh(self.sc.value)
        observed = None
        # P(positive) for `neuron score`: fitted on the values the reading loss saw, once there are
        # enough; before that, the reading loss's own logit (scale * value, no intercept)
        logistic = {"slope": self._scale, "intercept": 0.0, "fitted_on": "reading loss"}
        if len(pos) >= 8 and len(neg) >= 8:
            values, labels = torch.tensor(pos + neg), torch.tensor([1] * len(pos) + [0] * len(neg))
            observed = fix_values_of(values, labels, 1)
            logistic = {**fit_logistic(values, labels), "fitted_on": "observed"}
        return {
            "unit": BOUND_UNIT, "layer": self.top, "state": self.state, "polarity": 1,
            "fix_values": {"positive": v, "negative": -v}, "observed_fix_values": observed, "source": "bind",
            "train_value": self.sc.value, "observed": {"positive": list(pos), "negative": list(neg)},
            "logistic": logistic,
        }

    # ------------------------------------------------------------ the parts

    def _reading_batch(self, step: int):
        """The step's reading texts (seeded by step, so a resumed run draws the same): id sequences
        (a newline, then the text's last `read_chars` characters) and their labels."""
        n, spans = self.sc.read, self.spans
        if n == 0 or spans.shape[1] == 0 or self.sc.weight == 0:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        pick = torch.randint(spans.shape[1], (n,), generator=g)
        starts, ends, labels = spans[:, pick]
        starts = torch.maximum(starts, ends - self.sc.read_chars)
        seqs = [[self.nl] + self.data[a:b].tolist() for a, b in zip(starts.tolist(), ends.tolist())]
        return seqs, labels.float()

    def extra_loss(self, read: torch.Tensor, x: torch.Tensor, y: torch.Tensor, carry_in, logits: torch.Tensor) -> torch.Tensor:
        """The binding's terms beside the language-model loss (see the module docstring); `read` (B, T) is
        the unit's own value at every step."""
        total = logits.new_zeros((), dtype=torch.float32)
        if self._read is not None:  # the reading pass: the loss after each text's last character
            seqs, labels = self._read
            v = unit_at_ends(self.model, seqs, logits.device, BOUND_UNIT)
            self._observe(v.detach().cpu(), labels)
            total = total + self.sc.weight * F.binary_cross_entropy_with_logits(self._scale * v, labels.to(v.device))
        else:  # the loss at every character of the free reviews in the streamed batch
            self._observe(read[:, -1].detach().float().cpu()[self._free], self._labels[:, -1][self._free])
            lab = self._labels.to(logits.device)
            known = (lab == 0) | (lab == 1)  # characters of free reviews
            if known.any() and self.sc.weight > 0:
                total = total + self.sc.weight * F.binary_cross_entropy_with_logits(
                    self._scale * read.float()[known], lab[known].float())
        if self._contrast_weight > 0:
            total = total + self._contrast_weight * self._contrast(x, y, carry_in, logits)
        return total

    def _contrast(self, x, y, carry_in, logits) -> torch.Tensor:
        """Generative-classifier loss on fixed reviews: -log sigmoid(mean_t log p(x_t | label) - log p(x_t | opposite)).

        The rows inside a fixed review run a second time with the unit fixed to the opposite value;
        the loss asks the text to be more likely under its own label than under the other, so the
        rest of the network must make the unit's value change what it writes."""
        fixed = (self._labels >= 2).to(x.device)  # (B, T)
        rows = self._rows  # chosen in forward
        if rows.numel() == 0:
            return logits.new_zeros((), dtype=torch.float32)
        other = self._other  # the fused cells ran it beside the first pass; custom cells run it here
        if other is None:
            other, _, _ = self.model(x[rows], None, tuple(s[:, rows] for s in carry_in), write=Write(-self._values[rows]))
        mask = fixed[rows].float()
        vocab = logits.shape[-1]
        own = -F.cross_entropy(logits[rows].float().reshape(-1, vocab), y[rows].reshape(-1), reduction="none")
        opp = -F.cross_entropy(other.float().reshape(-1, vocab), y[rows].reshape(-1), reduction="none")
        # the mean log-likelihood ratio per fixed character: a sum over the chunk made this term's
        # gradient dwarf the language model's under the global norm clip (measured: val loss 2.28
        # instead of 1.84 after 330 steps)
        d = ((own - opp).view(len(rows), -1) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.softplus(-d).mean()

    def _observe(self, v: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the unit's values `v` (c, or h without a cell state) where its reading loss looked, by label."""
        for name, y in (("positive", 1), ("negative", 0)):
            sel = v[labels == y]
            if sel.numel():
                buf = self.observed[name]
                buf.extend(sel.tolist())
                del buf[: max(0, len(buf) - OBSERVED_KEEP)]
