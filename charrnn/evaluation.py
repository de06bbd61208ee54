"""Validation loss of a model over held-out text, read as contiguous streams with the state carried along."""

from __future__ import annotations

import torch

from charrnn.distributed import Dist
from charrnn.errors import UsageError
from charrnn.model import CharRNN


@torch.no_grad()
def evaluate(model: CharRNN, data: torch.Tensor, max_chars: int | None = None, seq_len: int = 256,
             streams: int = 64, device: torch.device | None = None, dist: Dist | None = None) -> tuple[float, int]:
    """Mean loss (nats/char) over `data`, read as contiguous streams with the state carried along.

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
        state = model.init_state(rows.shape[0], device)
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
