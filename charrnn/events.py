"""What a training run reports: one small frozen dataclass per event, and `TrainEvents`, the receiver.

The trainer never prints. It calls one `TrainEvents` method per event, on the main process only;
the CLI's receiver is `ui.TrainDisplay`. Every method does nothing unless overridden, so a receiver
implements only the events it wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charrnn.config import TrainConfig


@dataclass(frozen=True)
class StartEvent:
    """The run is built and about to take its first step (of this session)."""

    run_dir: Path
    params: int  # trainable parameters of the model
    config: TrainConfig  # the resolved configuration
    train_chars: int  # characters of training text
    val_chars: int  # characters held out for validation
    vocab_size: int
    total_steps: int  # the schedule's length (for a time budget, a first estimate)
    time_budget_s: float | None  # the wall-clock budget, None for --steps/--epochs
    device: str  # where it trains, e.g. "cpu" or "cuda:0"
    resumed_from: int | None  # the step a resumed run continues from; None for a new run
    precision: str = "fp32"  # what the forward pass runs in: "fp32", "bf16" or "fp16" (charrnn/precision.py)
    precision_why: str = ""  # how it was chosen, e.g. "auto: bf16 measured 1.52x fp32"


@dataclass(frozen=True)
class SizingEvent:
    """A new CPU run with a time budget and no --hidden chose its width from this machine's speeds
    (charrnn/sizing.py), before it was built; the run keeps the same in its RunState.sizing."""

    layers: int
    chars_per_s: dict[int, float]  # training speed by width, narrowest first: those the rule weighed
    chars_per_param: dict[int, float]  # the training characters per parameter each would read in the budget
    hidden: int  # the width chosen: the widest with at least `rule` characters per parameter
    rule: float  # the characters per parameter the chosen width had to read (config.rule_for)
    budget_s: float
    timed: tuple[int, ...]  # the widths timed now; the others' speeds came from the cache
    seconds: float  # what the measurement took


@dataclass(frozen=True)
class StepEvent:
    """Every LOG_EVERY steps (and at the last): the training loss and speed, as metrics.jsonl records them."""

    step: int  # optimiser steps done
    total_steps: int  # the schedule's length (refined during a time budget)
    elapsed_s: float  # wall-clock seconds of the run, over all its sessions
    loss: float  # training loss of the last step, nats/char
    lr: float  # the learning rate that step used
    grad_norm: float  # its gradient norm before clipping (0.0 when it was not finite)
    chars_per_s: float  # training characters per second of step time, over the whole run
    recent_chars_per_s: float  # the same since the last StepEvent, wall-clock (evaluations included)
    time_budget_s: float | None  # the wall-clock budget, None for --steps/--epochs
    lr_scale: float = 1.0  # the peak learning rate's scale, below 1 after rollbacks


@dataclass(frozen=True)
class EvalEvent:
    """A validation loss was measured (a checkpoint is saved right after it)."""

    step: int
    total_steps: int
    elapsed_s: float
    chars_per_s: float
    val_loss: float  # nats/char on the held-out text
    val_bpc: float  # the same in bits/char
    best: bool  # the best validation loss of the run so far
    sample: str | None = None  # the seeded sample drawn after it (TrainConfig.eval_sample_len); None: off


@dataclass(frozen=True)
class SaveEvent:
    """A checkpoint was written (atomically) and older ones beyond --keep and the best removed."""

    path: Path
    size: int  # bytes
    removed: tuple[Path, ...]  # checkpoints deleted by the rotation


@dataclass(frozen=True)
class WarnEvent:
    """Something went wrong that the run recovered from (a skipped step, a rollback)."""

    message: str  # one line


@dataclass(frozen=True)
class RollbackEvent:
    """The run went back to its last good state and lowered the learning rate (or, for a loss spike past
    the limit on rollbacks, only says it will not roll back again: then to_step is None)."""

    message: str  # one line, as a warning says it
    reason: str  # "loss spike", "validation spike" or "non-finite" (NaN, infinity or an exploding loss)
    step: int  # the step at which it was found
    to_step: int | None  # the step of the state it went back to
    observed: float | None  # the loss that gave it away: the recent training loss, or the validation loss
    level: float | None  # what that loss was compared with: the training-loss level, or the best validation loss
    lr_scale: float  # the peak learning rate's scale from now on


@dataclass(frozen=True)
class EndEvent:
    """The run stopped; `Trainer.run` returns these fields as a dict."""

    reason: str  # "done", "early stop" (--patience) or "interrupted" (a signal)
    step: int
    run_dir: Path
    val_loss: float | None  # the last validation loss (None when interrupted)
    best_val_loss: float | None
    best_step: int | None
    elapsed_s: float
    chars_per_s: float  # training characters per second of step time, over the whole run
    params: int
    patience: int  # the --patience the run used (0: never stops early)
    signal: int | None = None  # the signal number that interrupted it
    path: Path | None = None  # the checkpoint saved on an interruption


class TrainEvents:
    """Receives a run's events; every method is a no-op until a subclass overrides it."""

    def on_sizing(self, e: SizingEvent) -> None:
        pass

    def on_start(self, e: StartEvent) -> None:
        pass

    def on_step(self, e: StepEvent) -> None:
        pass

    def on_eval(self, e: EvalEvent) -> None:
        pass

    def on_save(self, e: SaveEvent) -> None:
        pass

    def on_warn(self, e: WarnEvent) -> None:
        pass

    def on_rollback(self, e: RollbackEvent) -> None:
        """By default a warning: a receiver that knows only on_warn still hears of it."""
        self.on_warn(WarnEvent(e.message))

    def on_end(self, e: EndEvent) -> None:
        pass


class Receivers(TrainEvents):
    """Several receivers as one (the progress display, a TensorBoard log, an API caller's callback),
    called in order; every on_* method of TrainEvents is forwarded, those added later too."""

    def __init__(self, *receivers: TrainEvents):
        self.receivers = receivers

    def _deliver(self, name: str, e) -> None:
        for r in self.receivers:
            getattr(r, name)(e)

    def close(self) -> None:
        for r in self.receivers:
            if hasattr(r, "close"):
                r.close()


for _name in [n for n in vars(TrainEvents) if n.startswith("on_")]:
    setattr(Receivers, _name, lambda self, e, _name=_name: self._deliver(_name, e))
del _name
