"""A run's progress (all a checkpoint carries for an exact resume besides weights and optimiser) and one session's timing."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from charrnn.config import DEFAULT_MAX_EPOCHS, EVALS_PER_RUN, TrainConfig, time_budget

MAX_EVAL_EVERY = 1000  # a long --steps run still evaluates (and saves) at least this often


@dataclass
class RunState:
    """What changes while a run trains; the config (frozen) holds what was asked for."""

    step: int = 0  # optimiser steps done; also the index of the next batch
    total_steps: int = 0  # the schedule's length
    elapsed_s: float = 0.0  # wall-clock seconds trained so far, over all sessions
    train_s: float = 0.0  # of which in training steps (not evaluation or saving)
    chars_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    lr_scale: float = 1.0  # lowered after a rollback (from non-finite values or a loss spike)
    rollbacks: int = 0  # rollbacks from non-finite or exploding losses (recovery.py)
    spike_rollbacks: int = 0  # rollbacks from loss spikes (spike.py)
    spike: dict = field(default_factory=dict)  # the spike detector's averages (spike.SpikeDetector)
    evals_since_best: int = 0  # for --patience
    time_budget_s: float | None = None
    history: list = field(default_factory=list)
    # steps between evaluations: --eval-every, or chosen by the run (for a time budget, re-estimated
    # from the measured speed while --eval-every is not given)
    eval_every: int | None = None
    # the precision the run trains in ("fp32", "bf16" or "fp16"), chosen once from --precision when it
    # starts (auto measures), so a resume trains as it did; None: a run from before it was kept here
    precision: str | None = None
    # a CPU run that chose its width from this machine's measured speeds: what it measured and chose
    # (sizing.Sizer.record); None: the width was given, inherited or chosen without measuring
    sizing: dict | None = None

    @classmethod
    def start(cls, cfg: TrainConfig, batches_per_epoch: int) -> "RunState":
        """A new run's state: the schedule's length and evaluation interval, from the resolved config."""
        budget = time_budget(cfg)
        if cfg.steps is not None:
            total = cfg.steps
        elif cfg.epochs is not None:
            total = max(1, math.ceil(cfg.epochs * batches_per_epoch))
        elif cfg.time_s is None:  # no length given: the default budget, but never more than this many passes
            total = DEFAULT_MAX_EPOCHS * batches_per_epoch
        else:  # a time budget: an estimate, refined as the run measures its own speed
            total = 10**9
        every = cfg.eval_every
        if every is None and budget is None:
            every = max(1, min(MAX_EVAL_EVERY, total // EVALS_PER_RUN))
        return cls(total_steps=total, time_budget_s=budget, eval_every=every)

    @classmethod
    def from_checkpoint(cls, saved: dict, cfg: TrainConfig) -> "RunState":
        # checkpoints from before eval_every moved here kept the run's interval in the config
        return cls(**{"eval_every": cfg.eval_every, **saved})

    @property
    def timed(self) -> bool:
        """The run ends on its time budget, not after a number of steps."""
        return self.time_budget_s is not None

    def fit_to_budget(self, steps_done: int, spent_s: float) -> bool:
        """Set the schedule's length from the speed of this session's `steps_done` steps in `spent_s`
        (and the evaluation interval, the first time, unless given); False when too little was measured."""
        if steps_done < 5 or spent_s <= 0:
            return False
        left = self.time_budget_s - self.elapsed_s
        self.total_steps = max(self.step + 1, self.step + int(left * steps_done / spent_s))
        if self.eval_every is None:
            self.eval_every = max(10, (self.total_steps - self.step) // EVALS_PER_RUN)
        return True

    def eval_due(self) -> bool:
        return bool(self.eval_every and self.step % self.eval_every == 0) or self.step >= self.total_steps

    def record_eval(self, val_loss: float) -> bool:
        """Note a validation loss; True when it is the best so far."""
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = val_loss, self.step
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return improved

    def out_of_patience(self, patience: int) -> bool:
        """--patience evaluations in a row without a new best, before the schedule's end."""
        return bool(patience) and self.evals_since_best >= patience and self.step < self.total_steps


class Session:
    """Timing of this session (a resumed run adds to the time saved): elapsed time and recent speed."""

    def __init__(self, state: RunState):
        self.t0, self.elapsed_base, self.step0 = time.perf_counter(), state.elapsed_s, state.step
        self.last_log_t, self.last_log_chars = self.t0, state.chars_seen

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_base + ((now if now is not None else time.perf_counter()) - self.t0)

    def recent_speed(self, now: float, chars_seen: int) -> float:
        """Characters per second since the last call."""
        cps = (chars_seen - self.last_log_chars) / max(now - self.last_log_t, 1e-9)
        self.last_log_t, self.last_log_chars = now, chars_seen
        return cps
