"""Telling a loss spike from noise, long before the loss is non-finite: the recent training-loss level and the validation trend.

A run whose learning rate is too high for it can fall apart while every loss stays finite: on review
text a bound run went from a training loss of 1.86 to 2.5-3.3 and a validation loss of 1.81 to 4.88
(issue 19), and recovery.py's guard (non-finite, or above 10 ln V) never fired. The detector keeps
the last `window` training losses that were not suspect (so a spike cannot drag the level up with
it): their median is the level, their median absolute deviation the noise. A robust window, not a
slow exponential average: that one lags hundreds of steps behind the fast early fall of the loss
(measured: a level of 0.65 nats/char, and a deviation of 0.5, while the loss was 0.25), and would
miss a spike that comes soon after. It also keeps a fast average of every step. It declares a spike
when the loss stays well above the level for several steps in a row, or when a validation loss is well above the best one while the training loss has
not improved since that best (overfitting raises the validation loss too, but with the training loss
still falling: that is not a spike). The Trainer then rolls back (recovery.py) with a lower learning
rate. The detector's state is a plain dict of numbers kept in the RunState, so checkpoints carry it
and a resumed run judges exactly as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpikeLimits:
    """When a rise in the loss is a spike. Defaults written once, here; the run does not expose them as options."""

    # Steps (not suspect ones) whose median is the level: longer than a burst of hard batches, short
    # enough that the level follows the falling loss (it lags by about half of it).
    window: int = 50
    # Weight of the newest step in the fast average that the validation check compares: about 5 steps.
    fast_alpha: float = 0.2
    # Steps seen before judging: the loss falls fastest at first, and the window must hold the level
    # that follows, not the fall.
    min_steps: int = 100
    # A step is suspect above level + max(sigmas * noise, min_rise), the noise being the window's median
    # absolute deviation times 1.4826 (a standard deviation, for normal noise). min_rise keeps a very
    # smooth run (tiny noise) from calling a small bump a spike. The diverged bound run rose by 0.6 or more.
    sigmas: float = 4.0
    min_rise: float = 0.15  # nats/char
    # Suspect steps in a row that make a spike: one noisy batch, or the first window of an epoch (from a
    # zero state), is not one.
    streak: int = 5
    # A validation loss this far above the best one before it is a spike (when the training loss agrees):
    # issue 19 asks that no evaluation of a run lie more than 0.05 nats/char above the best before it.
    val_margin: float = 0.05  # nats/char
    # Each rollback multiplies the learning-rate scale by lr_factor; after max_rollbacks the run stops
    # lowering it and trains on (its losses are finite and its best checkpoint is kept).
    lr_factor: float = 0.5
    max_rollbacks: int = 3


LIMITS = SpikeLimits()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class SpikeDetector:
    """Judges each good step's training loss and each validation loss against the RunState's `spike`
    dict (recent, fast, seen, above, best_fast, off), which it updates in place. A rollback puts
    back the dict of the last good state (recovery.py), so the detector always reads it from `run`."""

    def __init__(self, run, limits: SpikeLimits = LIMITS):
        self.run, self.limits = run, limits

    @property
    def s(self) -> dict:
        return self.run.spike

    def give_up(self) -> None:
        """After max_rollbacks: judge no more in this run (the learning rate stays as it is)."""
        self.s["off"] = True

    def threshold(self) -> float | None:
        """The training loss above which a step is suspect; None while the detector is still learning the level."""
        s, lim = self.s, self.limits
        if s.get("seen", 0) < lim.min_steps:
            return None
        level = median(s["recent"])
        noise = 1.4826 * median([abs(x - level) for x in s["recent"]])
        return level + max(lim.sigmas * noise, lim.min_rise)

    def observe(self, loss: float) -> bool:
        """Note one good step's training loss; True when it completes a spike (`streak` suspect steps in a row)."""
        s, lim = self.s, self.limits
        if s.get("off"):
            return False
        s["fast"] = loss if "fast" not in s else s["fast"] + lim.fast_alpha * (loss - s["fast"])
        limit = self.threshold()
        if limit is not None and loss > limit:
            s["above"] = s.get("above", 0) + 1
            return s["above"] >= lim.streak
        s["above"] = 0
        s["recent"] = [*s.get("recent", [])[-(lim.window - 1):], loss]
        s["seen"] = s.get("seen", 0) + 1
        return False

    def note_best(self) -> None:
        """A new best validation loss: remember the training loss that went with it."""
        if "fast" in self.s:
            self.s["best_fast"] = self.s["fast"]

    def val_spike(self, val: float, best: float | None) -> bool:
        """A validation loss more than val_margin above the best one before it, while the recent training
        loss is no lower than it was at that best (so the run is not merely overfitting)."""
        s = self.s
        if s.get("off") or best is None or val <= best + self.limits.val_margin or "best_fast" not in s:
            return False  # without a training loss at the best (a run saved before this detector): no evidence
        return s["fast"] >= s["best_fast"]

    def level(self) -> float | None:
        """The training-loss level: the median of the recent steps that were not suspect."""
        return median(self.s["recent"]) if self.s.get("recent") else None

    def recent(self) -> float | None:
        return self.s.get("fast")
