"""A CPU run's width from this machine's measured speed: each candidate width timed for a few training steps,
the speeds cached per machine, and config.width_for's rule applied to them (config.resolve asks a `Sizer`).

The rule weighs characters read per parameter in the budget, so it needs the speed of the machine at hand:
a table of widths by budget, measured once on one CPU, gives a machine twice as fast (or one training in
bf16) the same model as the old one. Timing the candidates at the run's own batch, window, depth, precision,
thread count and binding (`train --sentiment-unit`: its contrast pass and reading loss are part of the
budget) costs a few seconds, narrowest first, stopping at the first width the budget is too short for (a
wider one reads fewer characters per parameter still). The two widths that decide (the first one the budget
looks too short for, and the one chosen) are timed a second time and the faster counts: one busy second on a
shared machine is enough to make a width look several times slower than it trains. The speeds are remembered in
`cache_dir()/sizing/speeds.json`, keyed by the machine and the shape, so the next run pays nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from charrnn.config import Speed, TrainConfig, chars_per_param, rule_for, weight_decay_for, width_for
from charrnn.device import cpu_has_bf16, machine_key
from charrnn.model import CharRNN, ModelConfig, Write

WARMUP_STEPS = 1  # the first step allocates Adam's moments and picks the kernels: not what a step costs after
MIN_STEPS, MAX_STEPS = 2, 6  # timed steps per width: at least MIN_STEPS, more while under STEP_SECONDS
STEP_SECONDS = 0.3
MAX_SECONDS = 15.0  # no further width is timed once the measurement has taken this long


def cache_file() -> Path:
    from charrnn.cache import measurement_file

    return measurement_file("sizing")


def _modes(asked: str) -> tuple[str, ...]:
    """The precisions a width is timed in: the run's, or for auto on a CPU with native bf16 both (the faster counts)."""
    if asked == "fp32" or not cpu_has_bf16():
        return ("fp32",)
    return ("bf16",) if asked == "bf16" else ("fp32", "bf16")


def cache_key(cfg: TrainConfig, hidden: int, vocab_size: int) -> str:
    """The shape (cell, depth, width, batch, window, vocabulary, binding) and the machine (CPU, torch, threads,
    precision)."""
    bound = f" bound {cfg.sentiment.fixed:g}" if cfg.sentiment.unit else ""
    return (f"{cfg.cell} {cfg.layers}x{hidden} embed {cfg.embed} vocab {vocab_size} batch {cfg.batch_size} "
            f"seq {cfg.seq_len}{bound} | {machine_key()} | "
            f"precision {'+'.join(_modes(cfg.precision))}")


def cached(key: str, path: Path | None = None) -> Speed | None:
    from charrnn.cache import read_measurements

    entry = read_measurements("sizing", path).get(key)
    try:
        speed = Speed(float(entry["chars_per_s"]), int(entry["params"]))
    except (TypeError, KeyError, ValueError):
        return None
    return speed if speed.chars_per_s > 0 and speed.params > 0 else None


def remember(key: str, speed: Speed, precision: str, path: Path | None = None) -> None:
    """Add one width's speed to the cache file, atomically; a cache that cannot be written is skipped."""
    from charrnn.cache import remember_measurement

    remember_measurement("sizing", key, {"chars_per_s": speed.chars_per_s, "params": speed.params,
                                         "precision": precision, "measured_at": time.time()}, path)


def time_width(cfg: TrainConfig, hidden: int, vocab_size: int) -> tuple[Speed, str]:
    """(speed, precision) of training a `hidden`-wide model of the run's shape: the fastest of a few steps
    (forward, backward, clipping, AdamW), on random ids, in each of the run's precisions; the faster one counts
    (bf16 only when clearly faster, as precision.choose decides)."""
    from charrnn.precision import BF16_MIN_SPEEDUP

    bound = 0 if cfg.sentiment.unit else None
    model = CharRNN(ModelConfig(vocab_size, cfg.cell, cfg.layers, hidden, cfg.embed, 0.0, bound)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=weight_decay_for(cfg))  # the run's decay
    idx = torch.randint(vocab_size, (cfg.batch_size, cfg.seq_len + 1))
    state = model.init_state(cfg.batch_size, torch.device("cpu"))
    seconds = {}
    for mode in _modes(cfg.precision):
        try:
            seconds[mode] = _seconds_per_step(model, optimizer, idx, state, mode == "bf16", _binding(cfg))
        except RuntimeError:  # a kernel without bf16 on this CPU: that precision is not an option
            continue
    if not seconds:
        raise RuntimeError(f"no precision trains a {cfg.cell} {cfg.layers}x{hidden} here")
    best = "bf16" if "bf16" in seconds and ("fp32" not in seconds or
                                            seconds["fp32"] / seconds["bf16"] >= BF16_MIN_SPEEDUP) else "fp32"
    return Speed(cfg.batch_size * cfg.seq_len / seconds[best], model.num_params()), best


def _binding(cfg: TrainConfig) -> Write | None:
    """What a bound run's step writes and reruns (neuron/bind.py), for timing it: the fixed share of the streams
    hold +-tanh(value) and run the top layer a second time with the opposite value (the contrast), every
    stream reads the unit (the reading loss). None for a plain run."""
    if not cfg.sentiment.unit:
        return None
    sc = cfg.sentiment
    signs = torch.where(torch.arange(cfg.batch_size) % 2 == 0, 1.0, -1.0)
    values = (signs * math.tanh(sc.value))[:, None].expand(cfg.batch_size, cfg.seq_len).contiguous()
    rows = torch.arange(max(1, round(sc.fixed * cfg.batch_size)))[: sc.contrast_rows]
    return Write(values, rows=rows, other=-values[rows])


def _seconds_per_step(model: CharRNN, optimizer, idx: torch.Tensor, state: tuple, bf16: bool,
                      binding: Write | None = None) -> float:
    times: list[float] = []
    start = time.perf_counter()
    for i in range(WARMUP_STEPS + MAX_STEPS):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            write = None if binding is None else Write(binding.values, rows=binding.rows, other=binding.other)
            _, loss, _ = model(idx[:, :-1], idx[:, 1:], state, write=write)
            if write is not None:  # the reading loss and the contrast's second pass, as a bound run pays them
                loss = loss + write.read.float().square().mean()
                if write.other_logits is not None:
                    loss = loss + write.other_logits.float().logsumexp(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
            if len(times) >= MIN_STEPS and time.perf_counter() - start >= STEP_SECONDS:
                break
    return min(times)


@dataclass
class Sizer:
    """The `measure` that config.resolve asks for a CPU run with a time budget and no --hidden: the speed of
    each candidate width, narrowest first, from the cache or timed now, until the budget is too short for one.
    Afterwards it holds what it found, for the run's record and its report."""

    vocab_size: int
    budget_s: float
    train_chars: int | None = None  # the run's training text: a budget that cannot read it once lowers the rule
    speeds: dict[int, Speed] = field(default_factory=dict)  # by width, as the rule weighed them
    timed: list[int] = field(default_factory=list)  # widths timed now (the others came from the cache)
    retimed: list[int] = field(default_factory=list)  # widths timed a second time now (the faster counts)
    seconds: float = 0.0  # the measurement's wall-clock time

    def __call__(self, cfg: TrainConfig, widths: list[int]) -> dict[int, Speed]:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (seconds):
        start = time.perf_counter()  # a cost of the process, which the run pays anyway, not of the measurement
        with torch.random.fork_rng(devices=[]):  # the run's random stream is left as it was
            for h in sorted(widths):
                key = cache_key(cfg, h, self.vocab_size)
                speed = cached(key)
                if speed is None:
                    if time.perf_counter() - start > MAX_SECONDS:
                        break
                    try:
                        speed = self._time(cfg, h, key)
                    except RuntimeError:  # out of memory for this width, say: the narrower ones decide
                        break
                    self.timed.append(h)
                if self._too_short(speed) and h in self.timed:
                    speed = self._time(cfg, h, key, speed)  # a second look before it decides (see _time)
                self.speeds[h] = speed
                if self._too_short(speed):
                    break  # a wider model reads fewer characters per parameter still
            chosen = width_for(self.speeds, self.budget_s, self.train_chars) if self.speeds else None
            if chosen in self.timed and chosen not in self.retimed:  # its speed also predicts the passes (dropout)
                self.speeds[chosen] = self._time(cfg, chosen, cache_key(cfg, chosen, self.vocab_size),
                                                 self.speeds[chosen])
        self.seconds = time.perf_counter() - start
        self._no_slower_than_wider()
        return dict(self.speeds)

    def _too_short(self, speed: Speed) -> bool:
        return chars_per_param(speed, self.budget_s) < rule_for(speed, self.budget_s, self.train_chars)

    def _time(self, cfg: TrainConfig, hidden: int, key: str, first: Speed | None = None) -> Speed:
        """Time one width and cache it. With `first` (its speed timed a moment ago) this is the second look,
        and the faster of the two counts: the width that decides the run (the first the budget looks too short
        for, and the one chosen) is timed twice, since one busy second on a shared machine timed a 2x256 LSTM
        at 18,346 chars/s that then trained at 46,000 (and so chose a narrower model than the machine can
        train, and a dropout for too few passes)."""
        speed, mode = time_width(cfg, hidden, self.vocab_size)
        if first is not None:
            self.retimed.append(hidden)
            if first.chars_per_s >= speed.chars_per_s:
                return first
        remember(key, speed, mode)
        return speed

    def _no_slower_than_wider(self) -> None:
        """A narrower model trains at least as fast as a wider one: a narrower width measured slower was timed in
        a busy moment (on a loaded 2-core machine two threads once timed 2x128 at 542 chars/s, 2x192 at 7,517
        a minute later), so it gets the wider one's speed."""
        fastest_wider = 0.0
        for h in sorted(self.speeds, reverse=True):
            s = self.speeds[h]
            if s.chars_per_s < fastest_wider:
                self.speeds[h] = Speed(fastest_wider, s.params)
            fastest_wider = max(fastest_wider, self.speeds[h].chars_per_s)

    def record(self, chosen: int) -> dict:
        """What the run keeps (RunState.sizing): the speeds weighed, the width chosen and the rule."""
        return {"chars_per_s": {str(h): round(s.chars_per_s, 1) for h, s in self.speeds.items()},
                "params": {str(h): s.params for h, s in self.speeds.items()},
                "chars_per_param": {str(h): round(chars_per_param(s, self.budget_s), 2) for h, s in self.speeds.items()},
                "hidden": chosen, "rule_chars_per_param": rule_for(self.speeds[chosen], self.budget_s, self.train_chars),
                "budget_s": self.budget_s,
                "timed": list(self.timed), "retimed": list(self.retimed), "seconds": round(self.seconds, 2)}
