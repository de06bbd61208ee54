"""What a training step minimises: the interface the Trainer drives, and the plain language-model objective.

The Trainer calls every objective the same way, every step: `before_step(step, carry, total_steps)
-> carry` right before the forward pass (total_steps: the schedule's length, 0 if unknown), then `forward(net, x, y, carry) -> (language-model loss, objective,
carry)`: the loss it reports and judges, the objective it backpropagates, and the state carried to
the next window. When it builds a checkpoint it asks `record()` for the unit record to store (None:
none). The other objective is charrnn.neuron.bind.BoundObjective (`train --sentiment-unit`).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    def before_step(self, step: int, carry: tuple[torch.Tensor, ...], total_steps: int = 0) -> tuple[torch.Tensor, ...]: ...

    def forward(self, net, x: torch.Tensor, y: torch.Tensor, carry: tuple[torch.Tensor, ...]): ...

    def record(self) -> dict | None: ...


class LanguageModelObjective:
    """The plain objective: the language model's loss, nothing fixed."""

    def __init__(self, record: dict | None = None):
        self._record = record  # a unit record carried from the checkpoint the run started from

    def before_step(self, step: int, carry, total_steps: int = 0):
        return carry

    def forward(self, net, x: torch.Tensor, y: torch.Tensor, carry):
        _, loss, carry = net(x, y, carry)  # (B, T, V) logits are not needed: the loss is the objective
        return loss, loss, carry

    def record(self) -> dict | None:
        return self._record
