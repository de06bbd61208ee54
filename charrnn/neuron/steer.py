"""Steering: the checkpoint's unit record, the one check that a unit and state exist, and the hooks that fix a unit.

To fix a unit is to hold it at a value at every step (`sample --sentiment`, `--neuron K --value V`,
and the fixed reviews of `train --sentiment-unit`). A hook follows charrnn/model.py's contract:
`hook(layer, t, state) -> state`, with `hook.first_layer` keeping the layers below on the fused kernel.
"""

from __future__ import annotations

import math

import torch

from charrnn.errors import CheckpointError, UsageError
from charrnn.model import set_unit

RECORD_KEY = "sentiment"  # the checkpoint entry that holds the unit record
# Records written before "fix" became the one word for holding a unit at a value: old key -> new key.
OLD_RECORD_KEYS = {"clamp": "fix_values", "observed_clamp": "observed_fix_values", "train_clamp": "train_value"}


# ---------------------------------------------------------------- which units and states exist


def state_names(model) -> tuple[str, ...]:
    """Names of the state tuple's parts: ('h', 'c') for LSTM-like cells, ('h',) for GRU and RNN."""
    return ("h", "c") if len(model.init_state(1)) == 2 else ("h",)


def default_state(model) -> str:
    return "c" if "c" in state_names(model) else "h"


def check_unit(model, unit: int | None, state: str | None, layer: int = -1) -> None:
    """The one check that `unit` (of `layer`) and `state` ('h', 'c' or 'c+h') exist in `model`;
    None skips a part. Every command that names a unit or a state (sample, neuron find, neuron
    show) goes through here, so each gets the same message."""
    names = state_names(model)
    for part in state.split("+") if state else ():
        if part not in names:
            raise UsageError(f"this {model.config.cell} model has no '{part}' state; use --state {names[0]}")
    hidden, layers = model.config.hidden, model.config.layers
    if unit is not None and not 0 <= unit < hidden:
        raise UsageError(f"--neuron {unit} is out of range; this model has {hidden} units per layer")
    if not -layers <= layer < layers:
        raise UsageError(f"layer {layer} is out of range; this model has {layers} layers")


# ---------------------------------------------------------------- the unit record


def upgrade_record(rec: dict | None) -> dict | None:
    """The record with today's key names; a record from an older checkpoint has its old keys renamed."""
    if not rec:
        return rec
    out = dict(rec)
    for old, new in OLD_RECORD_KEYS.items():
        if old in out:
            out.setdefault(new, out.pop(old))
    return out


def get_record(ck: dict) -> dict:
    """The checkpoint's sentiment unit (today's key names), or a CheckpointError that says how to get one."""
    rec = upgrade_record(ck.get(RECORD_KEY))
    if not rec or "unit" not in rec:
        raise CheckpointError(
            f"{ck.get('path', 'this checkpoint')} has no sentiment unit; find one with "
            "'charrnn neuron find CHECKPOINT LABELED.tsv' or train with 'charrnn train REVIEWS.tsv --sentiment-unit'"
        )
    return rec


def set_record(ck: dict, rec: dict) -> None:
    ck[RECORD_KEY] = rec


# ---------------------------------------------------------------- hooks


def fix_hook(unit: int, fix: dict, layer: int):
    """A model hook that fixes one unit of one layer at every step. `fix` maps a state part's index
    (0 = h, 1 = c) to its value: a number, or a (B,) tensor with one value per sequence. Layers below
    `layer` are left alone (and so may run on the fused kernel)."""

    def hook(l: int, t: int, state):
        if l != layer:
            return state
        parts = list(state)
        for i, v in fix.items():
            s = parts[i]
            col = v.to(s.device, s.dtype) if torch.is_tensor(v) else s.new_full((s.shape[0],), v)
            parts[i] = set_unit(s, unit, col)
        return tuple(parts)

    hook.first_layer = layer
    return hook


def hook_for(model, unit: int, value, state: str, layer: int = -1):
    """The hook that fixes `unit` of `layer` to `value` on `state`: 'h', 'c', or 'c+h' (c at value and
    h at tanh(value): the unit as if its output gate were open, as `train --sentiment-unit` fixes it)."""
    check_unit(model, unit, state, layer)
    names, parts = state_names(model), state.split("+")
    fix = {}
    for part in parts:
        squash = part == "h" and len(parts) > 1
        fix[names.index(part)] = (value.tanh() if torch.is_tensor(value) else math.tanh(value)) if squash else value
    return fix_hook(unit, fix, layer % model.config.layers)


# ---------------------------------------------------------------- sample's steering


def _sentiment_target(ck: dict, sentiment: str, value: float | None, state: str | None):
    """(unit, layer, state, value, opposite value) for `--sentiment S [--value V]`, from the record."""
    if sentiment not in ("positive", "negative"):
        raise UsageError(f"--sentiment must be positive or negative (got {sentiment!r})")
    rec = get_record(ck)
    if state is not None and state != rec["state"]:
        raise UsageError(f"the sentiment unit was found on the '{rec['state']}' state; leave out --state "
                         f"or fix a unit by hand with --neuron K --value V --state {state}")
    fixed = rec["fix_values"]
    other = fixed["negative" if sentiment == "positive" else "positive"]
    if value is not None:  # a hand-given value; the opposite one mirrors it across the midpoint
        other = fixed["positive"] + fixed["negative"] - value
    value = fixed[sentiment] if value is None else value
    return rec["unit"], rec["layer"], rec["state"], value, other


def steering_hook(model, ck: dict, sentiment: str | None = None, neuron: int | None = None,
                  value: float | None = None, state: str | None = None, guided_rows: int = 0):
    """The hook for `sample`: (hook or None, a one-line description of what is fixed).

    With guided_rows = n > 0 (sample --guidance) the hook covers 2n rows: the first n fixed as asked,
    the last n fixed the opposite way (the other sentiment's value, or -V for --neuron K --value V)."""
    if sentiment is None and neuron is None and value is None:
        if state is not None:
            raise UsageError("--state chooses the state of --sentiment or --neuron; give one of them too")
        if guided_rows:
            raise UsageError("--guidance contrasts two fixed values of a unit; give --sentiment or --neuron K --value V too")
        return None, ""
    if sentiment is not None and neuron is not None:
        raise UsageError("give --sentiment or --neuron K --value V, not both")
    if sentiment is None and (neuron is None or value is None):
        raise UsageError("--neuron K needs --value V, and --value needs --neuron K or --sentiment")
    if sentiment is not None:
        unit, layer, state, value, other = _sentiment_target(ck, sentiment, value, state)
    else:
        unit, layer, state, other = neuron, model.config.layers - 1, state or default_state(model), -value
    said = f"fixing unit {unit} of layer {layer} ({state}) at {value:.3f}"
    if guided_rows:
        values = torch.tensor([float(value)] * guided_rows + [float(other)] * guided_rows)
        return hook_for(model, unit, values, state, layer), said + f", contrasted with {other:.3f}"
    return hook_for(model, unit, value, state, layer), said
