"""Gradient flow through time: how much the loss at the last step depends on the hidden state k steps back.

For windows of text, the gradient of the last step's loss with respect to each layer's hidden
state h_{T-k} is taken (through every path, c included for LSTM-like cells); its norm, averaged
over the windows, shows whether gradients vanish (fall fast with k) or explode (grow) in
backpropagation through time: the product of Jacobians dh_j/dh_{j-1} over the k steps between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from charrnn.errors import UsageError
from charrnn.model import CharRNN


def gradient_flow(model: CharRNN, data: torch.Tensor, k: int = 50, windows: int = 16) -> dict:
    """Norms of d loss_T / d h_{T-k}, k = 1..K, per layer, averaged over `windows` stretches of `data`.

    Each window is K+2 characters read from a zero state: K+1 inputs, and the character the last
    one should predict. Windows are spread evenly over `data` (1-D character ids).
    Returns {"k": [1..K], "norms": [[per k] per layer], "windows": W, "cell", "layers", "hidden"}.
    """
    if k < 1:
        raise UsageError(f"--k must be at least 1 (got {k})")
    span = k + 2
    n = len(data)
    if n < span:
        raise UsageError(f"the text has {n} characters; --k {k} needs at least {span}: lower --k or use a longer file")
    windows = max(1, min(windows, n // span))
    starts = torch.linspace(0, n - span, windows).long()
    chunk = torch.stack([data[s : s + span] for s in starts.tolist()]).long()  # (W, K+2)
    device = model.head.weight.device
    idx, target = chunk[:, :-1].to(device), chunk[:, -1].to(device)  # (W, K+1), (W,)
    steps = idx.shape[1]
    kept: dict[tuple[int, int], torch.Tensor] = {}

    def keep(layer: int, t: int, state):
        if t < steps - 1:  # h at the last step itself is k = 0
            state[0].retain_grad()
            kept[(layer, t)] = state[0]
        return state

    was_training = model.training
    model.eval()  # no dropout; gradients are still taken
    try:
        with torch.enable_grad():
            logits, _, _ = model(idx, hook=keep)  # (W, K+1, V)
            # summed, so each window's gradient is its own loss's
            loss = F.cross_entropy(logits[:, -1].float(), target, reduction="sum")
            loss.backward()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    layers = model.config.layers
    norms = [
        [kept[(layer, steps - 1 - j)].grad.norm(dim=-1).mean().item() for j in range(1, k + 1)]
        for layer in range(layers)
    ]
    return {
        "cell": model.config.cell, "layers": layers, "hidden": model.config.hidden,
        "k": list(range(1, k + 1)), "norms": norms, "windows": windows, "loss": loss.item() / windows,
    }
