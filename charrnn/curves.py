"""A run's validation-loss curve, read from its metrics.jsonl, and drawn as text for the terminal.

`checkpoints show` draws the text chart; `charrnn plot` (plot.py) draws the same curves as a picture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from charrnn.errors import CheckpointError

METRICS = "metrics.jsonl"  # charrnn.runfolder.METRICS (not imported: runfolder imports torch)


@dataclass(frozen=True)
class Curve:
    """The evaluations of one run, in step order."""

    run: Path
    steps: list[int]
    times: list[float]  # elapsed_s: wall-clock seconds of the run, over all its sessions
    losses: list[float]  # validation loss, nats/char

    @property
    def name(self) -> str:
        return self.run.name

    def best(self) -> tuple[float, int] | None:
        """(best validation loss, its step), or None before the first evaluation."""
        if not self.losses:
            return None
        i = min(range(len(self.losses)), key=self.losses.__getitem__)
        return self.losses[i], self.steps[i]


def read_curve(run: Path) -> Curve:
    """The validation losses in `run`/metrics.jsonl. A path that is not a run folder is one line
    (CheckpointError); lines cut short by a kill are skipped, and a step logged twice keeps its last."""
    run = Path(run)
    metrics = run / METRICS
    if not run.is_dir():
        raise CheckpointError(f"no run folder at {run}; give run folders made by 'charrnn train' (see 'charrnn checkpoints list')")
    if not metrics.is_file():
        inner = [p for p in run.iterdir() if (p / METRICS).is_file()]
        hint = f"; it holds runs: give them, e.g. {run / '*'}" if inner else ""
        raise CheckpointError(f"{run} is not a run folder (it has no {METRICS}){hint}")
    by_step: dict[int, tuple[float, float]] = {}
    try:
        lines = metrics.read_text(errors="replace").splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read {metrics}: {e.strerror or e}") from None
    for line in lines:
        try:
            rec = json.loads(line)
            step, loss, t = int(rec["step"]), float(rec["val_loss"]), float(rec.get("elapsed_s", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a training line, or one cut short
        if math.isfinite(loss):
            by_step[step] = (t, loss)
    steps = sorted(by_step)
    return Curve(run, steps, [by_step[s][0] for s in steps], [by_step[s][1] for s in steps])


# ---------------------------------------------------------------- the text chart

# Line pieces: flat, vertical, and the corners where the curve turns down (into, out of) and up (into, out of).
UNICODE = {"flat": "─", "vert": "│", "down_in": "╮", "down_out": "╰", "up_in": "╯", "up_out": "╭",
           "axis": "┤", "corner": "└", "rule": "─"}
ASCII = {"flat": "-", "vert": "|", "down_in": ".", "down_out": "'", "up_in": "'", "up_out": ".",
         "axis": "|", "corner": "+", "rule": "-"}


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """ys at x, linear between the measured points (xs ascending)."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            f = (x - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-12)
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    return ys[-1]


def text_chart(xs: list[float], ys: list[float], width: int = 80, height: int = 10, ascii: bool = False,
               x_label: str = "step") -> list[str]:
    """A line chart of ys against xs in `width` columns and `height` rows (plus an axis and its labels),
    without colour; `ascii` for terminals that cannot show box-drawing characters."""
    g = ASCII if ascii else UNICODE
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01  # a flat line in the middle
    labels = [f"{lo + (hi - lo) * r / (height - 1):.3f}" for r in range(height)]
    pad = max(map(len, labels))
    cols = max(2, width - pad - 2)
    x0, x1 = xs[0], xs[-1]
    values = [_interpolate(xs, ys, x0 + (x1 - x0) * c / (cols - 1)) for c in range(cols)] if len(xs) > 1 else [ys[0]]
    grid = [[" "] * len(values) for _ in range(height)]
    rows = [round((v - lo) / (hi - lo) * (height - 1)) for v in values]
    for c, r in enumerate(rows):
        prev = rows[c - 1] if c else r
        if r == prev:
            grid[r][c] = g["flat"]
            continue
        grid[prev][c], grid[r][c] = (g["down_in"], g["down_out"]) if r < prev else (g["up_in"], g["up_out"])
        for between in range(min(r, prev) + 1, max(r, prev)):
            grid[between][c] = g["vert"]
    lines = [f"{labels[r]:>{pad}} {g['axis']}" + "".join(grid[r]).rstrip() for r in reversed(range(height))]
    lines.append(" " * (pad + 1) + g["corner"] + g["rule"] * len(values))
    left, right = f"{x_label} {_fmt_x(x0)}", _fmt_x(x1)
    gap = max(1, len(values) + 1 - len(left) - len(right))
    lines.append(" " * (pad + 1) + left + (" " * gap + right if len(xs) > 1 else ""))
    return lines


def _fmt_x(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"
