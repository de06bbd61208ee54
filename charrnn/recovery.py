"""Surviving non-finite or exploding steps: skip a bad step, roll back after a streak, give up after several."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Callable

import torch

from charrnn.config import TrainConfig
from charrnn.errors import TrainingDiverged
from charrnn.model import CharRNN
from charrnn.runstate import RunState

MAX_BAD_STEPS = 3  # consecutive non-finite steps before rolling back
MAX_ROLLBACKS = 4  # rollbacks (each halving the learning rate) before giving up
EXPLODE_FACTOR = 10.0  # a training loss above this many times ln(V) (a uniform guess) has exploded
# Test-only: "N" puts a NaN into one weight the first time step N is reached; "N+" every time
# (a run that cannot recover). Lets tests force a real divergence; unset in normal use.
TEST_NAN_ENV = "CHARRNN_TEST_NAN_AT"


def judge(loss: float, grad_norm: float, vocab_size: int, overflow_skipped: bool) -> str | None:
    """What is wrong with a step's loss and gradient norm, or None. `overflow_skipped`: fp16, where the
    gradient scaler itself skips a non-finite gradient (and lowers its scale), as designed."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if loss > EXPLODE_FACTOR * math.log(max(vocab_size, 2)):
        return f"exploding loss ({loss:.3g} nats/char)"
    if not math.isfinite(grad_norm) and not overflow_skipped:
        return "non-finite gradient"
    return None


class NanInjector:
    """The test-only $CHARRNN_TEST_NAN_AT hook: a NaN in one weight, as a real overflow would leave."""

    def __init__(self, spec: str):
        self.at = int(spec.rstrip("+")) if spec.rstrip("+").isdigit() else None
        self.always = spec.endswith("+")

    @classmethod
    def from_env(cls) -> "NanInjector":
        return cls(os.environ.get(TEST_NAN_ENV, ""))

    def __call__(self, model: CharRNN, step: int) -> None:
        if self.at is not None and step == self.at:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
            if not self.always:
                self.at = None


class Recovery:
    """The last good state in memory, the count of bad steps in a row, and rollback to that state."""

    def __init__(self, cfg: TrainConfig, model: CharRNN, optimizer: torch.optim.Optimizer, state: RunState):
        self.cfg, self.model, self.optimizer, self.state = cfg, model, optimizer, state
        self.bad = 0  # bad steps in a row
        self.good: dict | None = None
        self.poison = NanInjector.from_env()

    def snapshot(self, carry: tuple) -> None:
        """Remember the current state as the last good one."""
        self.good = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "carry": tuple(s.clone() for s in carry),
            "step": self.state.step,
            "spike": copy.deepcopy(self.state.spike),  # the spike detector's averages at that state
        }

    def step_ok(self) -> None:
        self.bad = 0

    def step_bad(self) -> bool:
        """Count a bad step; True when the streak is long enough to roll back."""
        self.bad += 1
        return self.bad >= MAX_BAD_STEPS

    def unsafe_to_save(self) -> bool:
        """Inside a streak of bad steps, or right after a step that left NaN weights (its own loss was
        finite; the next one's would not be): the current weights are not the ones to save."""
        return self.bad > 0 or not all(torch.isfinite(p).all() for p in self.model.parameters())

    def restore(self) -> tuple:
        """Back to the last good state (weights, optimiser, step, spike detector); returns its carried state."""
        self.model.load_state_dict(self.good["model"])
        self.optimizer.load_state_dict(self.good["optimizer"])
        self.state.step = self.good["step"]
        self.state.spike = copy.deepcopy(self.good["spike"])
        self.bad = 0
        return tuple(s.clone() for s in self.good["carry"])

    def halve_lr(self, bad_step: int, save: Callable[[], Path]) -> str:
        """After a restore: halve the learning rate and return the warning to show.

        After MAX_ROLLBACKS it gives up instead: `save()` writes the restored state, and the error
        says how to start again from it.
        """
        st = self.state
        if st.rollbacks >= MAX_ROLLBACKS:
            path = save()  # the last good state, if it is not on disk already
            raise TrainingDiverged(
                f"training diverged at step {bad_step} (loss or gradients not finite or exploding) and did not "
                f"recover after {st.rollbacks} rollbacks with the learning rate halved each time; the last good "
                f"state (step {st.step}) is saved in {path}; start again from it with a lower learning rate, e.g. "
                f"'charrnn train CORPUS --init-from {path} --lr {self.cfg.lr * st.lr_scale / 10:.2g}"
                + (" --grad-clip 1'" if self.cfg.grad_clip == 0 else "'")
            )
        st.rollbacks += 1
        st.lr_scale *= 0.5
        return (f"step {bad_step}: {MAX_BAD_STEPS} bad steps in a row; rolled back to step {st.step} "
                f"(the last good state) and halved the learning rate (now {self.cfg.lr * st.lr_scale:.3g})")

    def final_diverged(self, final_step: int, path: Path) -> TrainingDiverged:
        """The error for a final evaluation that was not finite (rolled back to the state saved in `path`)."""
        st = self.state
        return TrainingDiverged(
            f"the final evaluation (step {final_step}) was not finite: the weights diverged "
            f"after the last good state (step {st.step}), saved in {path}; continue from it with a lower "
            f"learning rate, e.g. 'charrnn train CORPUS --init-from {path} --lr {self.cfg.lr * st.lr_scale:.2g}'")
