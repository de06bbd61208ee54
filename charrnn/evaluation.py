"""Validation loss of a model over held-out text, read as contiguous streams with the state carried along."""

from __future__ import annotations

import torch

from charrnn.distributed import Dist
from charrnn.errors import UsageError
from charrnn.model import CharRNN, State

# Characters read before each stream's first scored one. Batching cuts the text into 64 streams; started
# from a zero state, each stream's first characters were scored as if the text began there: on a 5-minute
# tiny Shakespeare model that added 0.0048 nats/char to the loss of reading the text in one piece
# (1.4498 against 1.4450); with 256 characters before it each stream scores as one piece does (docs/training.md).
CONTEXT_CHARS = 256


@torch.no_grad()
def evaluate(model: CharRNN, data: torch.Tensor, max_chars: int | None = None, seq_len: int = 256,
             streams: int = 64, device: torch.device | None = None, dist: Dist | None = None,
             context: int = CONTEXT_CHARS) -> tuple[float, int]:
    """Mean loss (nats/char) over `data`, read as contiguous streams with the state carried along.

    Each stream but the first starts from the state that the `context` characters before it leave (the end
    of the stream before), not from zeros, so no character is scored as if the text began there.
    Returns (loss, characters scored). Switches the model to eval mode and restores its mode.
    """
    device = device or model.head.weight.device
    if max_chars is not None:
        data = data[:max_chars]
    n = len(data)
    if n < 2:
        raise UsageError("not enough text to evaluate on (need at least 2 characters)")
    streams = max(1, min(streams, n // (seq_len + 1)))
    stream_len = n // streams
    rows = data[: streams * stream_len].view(streams, stream_len)  # (S, L); a short tail is not scored
    if dist is not None and dist.enabled:
        rows = rows[dist.rank :: dist.world]  # each process scores its share of the streams
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        state = _warmed_state(model, data, rows.shape[0], stream_len, context, dist, device)
        for p in range(0, stream_len - 1, seq_len):
            chunk = rows[:, p : p + seq_len + 1].long().to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            logits, _, state = model(x, state=state)  # (S, T, V)
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        total, count = dist.sum([total, float(count)])
        count = int(count)
    return total / max(count, 1), count


def _warmed_state(model: CharRNN, data: torch.Tensor, n_rows: int, stream_len: int, context: int,
                  dist: Dist | None, device) -> State:
    """The state each of this process's streams starts from: what the `context` characters before the stream
    leave, zeros for the first stream (the text starts there)."""
    state = model.init_state(n_rows, device)
    context = min(context, stream_len)
    if context < 1 or n_rows == 0:  # no context asked for, or more processes than streams
        return state
    shared = dist is not None and dist.enabled
    stream = torch.arange(n_rows) * (dist.world if shared else 1) + (dist.rank if shared else 0)  # by row
    starts = (stream * stream_len - context).clamp(min=0)
    prefix = torch.stack([data[s : s + context] for s in starts.tolist()]).long().to(device)  # (S, context)
    _, _, state = model(prefix, state=state)
    keep = (stream > 0).to(device)[None, :, None]  # the first stream has no text before it
    return tuple(torch.where(keep, s, torch.zeros_like(s)) for s in state)
