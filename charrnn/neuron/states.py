"""A model's states over text: the state parts' names, final states of many texts, one unit's trace.

Shared by finding (final states as features), binding (the unit's value where its reading loss
looks) and `neuron show` (the unit after each character).
"""

from __future__ import annotations

import torch

from charrnn.data import Vocab
from charrnn.neuron.steer import check_unit, default_state, state_names


def text_ids(text: str, vocab: Vocab) -> list[int]:
    """The ids a text is run as: a newline first (a text starts after one, as reviews do in training)."""
    stoi = vocab.stoi
    lead = [stoi["\n"]] if "\n" in stoi else []
    return lead + [stoi[c] for c in text]


def run_to_ends(model, seqs: list[list[int]], device) -> list[tuple[torch.Tensor, ...]]:
    """Each id sequence run from the zero state; per sequence, its state after its last id, a tuple of
    (layers, H) tensors (h, or h and c). Differentiable when grad is on.

    Sequences are sorted by length and run as one batch through the plain forward (the fused kernel
    where the cell has one), one segment per distinct length: rows that end are taken out, the rest
    carry on from their state."""
    n = len(seqs)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    lens = [len(seqs[i]) for i in order]
    x = torch.zeros(n, lens[-1], dtype=torch.long)
    for r, i in enumerate(order):
        x[r, : lens[r]] = torch.as_tensor(seqs[i])
    x = x.to(device)
    state = model.init_state(n, device)
    out: list = [None] * n
    pos, first = 0, 0  # characters consumed; first row still running
    while first < n:
        end = lens[first]
        if end > pos:
            _, _, state = model(x[first:, pos:end], state=state)
            pos = end
        stop = first
        while stop < n and lens[stop] == end:
            stop += 1
        for r in range(first, stop):
            out[order[r]] = tuple(s[:, r - first] for s in state)
        state = tuple(s[:, stop - first :].contiguous() for s in state)
        first = stop
    return out


def unit_at_ends(model, seqs: list[list[int]], device, unit: int = 0) -> torch.Tensor:
    """(N,) float: the top-layer unit's value (c, or h without a cell state: the state `neuron find`
    reads) after each id sequence's last id, run from the zero state (see run_to_ends)."""
    part = state_names(model).index(default_state(model))
    return torch.stack([e[part][-1, unit] for e in run_to_ends(model, seqs, device)]).float()


def final_states(model, vocab: Vocab, texts: list[str], batch_size: int = 128) -> dict[str, torch.Tensor]:
    """The state after each text's last character: {'h': (N, layers, H), 'c': ...} (see run_to_ends)."""
    model.eval()
    device = model.head.weight.device
    names = state_names(model)
    ids = [text_ids(t, vocab) for t in texts]
    probe = model.init_state(1, device)
    out = {n: torch.empty(len(ids), probe[0].shape[0], probe[0].shape[2]) for n in names}
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths
    with torch.no_grad():
        for b0 in range(0, len(order), batch_size):
            rows = order[b0 : b0 + batch_size]
            ends = run_to_ends(model, [ids[i] for i in rows], device)
            where = torch.tensor(rows)
            for k, name in enumerate(names):
                out[name][where] = torch.stack([e[k] for e in ends]).float().cpu()
    return out


@torch.no_grad()
def unit_trace(model, vocab: Vocab, text: str, unit: int, layer: int = -1, state: str = "c") -> list[float]:
    """The unit's value after each character of `text` (unknown characters must be removed first)."""
    model.eval()
    check_unit(model, unit, state, layer)
    si = state_names(model).index(state)
    device = model.head.weight.device
    ids = text_ids(text, vocab)
    lead = len(ids) - len(text)
    st = model.init_state(1, device)
    values = []
    for i in ids:
        _, st = model.step(torch.tensor([i], device=device), st)
        values.append(float(st[si][layer, 0, unit]))
    return values[lead:]
