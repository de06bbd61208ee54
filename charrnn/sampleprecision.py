"""Sampling's `--precision auto`: fp32 and bf16 timed on the model itself, the faster kept, cached per machine.

Which precision samples faster depends on the CPU as much as on the model: a 2x512 LSTM (17 MB of fp32
weights) sampled 2.97x faster in bf16 on one AVX512-BF16 machine and 0.92x on another whose 32 MB L3
cache holds the fp32 weights. So auto times a few steps of each, on the actual model and batch, and
remembers the winner in `cache_dir()/precision/sample.json`, keyed by the machine and the model's
shape: the next call pays nothing. Only CPUs with native bf16 are asked; elsewhere bf16 is emulated
(several times slower) and auto is fp32 without trying.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from charrnn.device import cpu_has_bf16, machine_key

# Untimed steps before the first timing (the first calls allocate and pick kernels) and before every round:
# sampling runs one copy only, whose weights stay in the CPU's cache, while the rounds alternate two, so each
# round first brings its copy's weights back. (On an AVX512-BF16 EPYC, 2x512 LSTM, one stream: steady loops
# of 400 steps took 0.41-0.48 ms in fp32 and 0.38-0.41 in bf16; rounds timed without this, fp32 0.90.)
# At least WARMUP_STEPS and WARMUP_SECONDS: on a 2-core EPYC 2 steps of one stream left fp32 at 0.28-0.30
# ms a step against a steady 0.22-0.27, 8 steps (2 ms) did not.
WARMUP_STEPS = 2
WARMUP_SECONDS = 0.002
# Each round times at least MIN_STEPS steps and goes on until ROUND_SECONDS have passed; each side's time is
# the median of its ROUNDS. Rounds of 6 steps and the best of 3 (before) were about 1.5 ms of one stream: one
# slow spell of a shared 2-core EPYC made fp32 read 0.289 ms a step (its steady 0.21-0.23), bf16 was cached
# for one stream, and `charrnn bench` then sampled at 2,883 chars/s where fp32 gave 3,817. The first call
# for a shape now spends about 0.1 s (2x512, one stream) to 0.2 s (64 streams) on this; later calls read the cache.
MIN_STEPS = 8
ROUND_SECONDS = 0.005
ROUNDS = 5  # fp32, bf16, fp32, bf16 ...: a slow spell of a shared machine hits both sides
# Without native bf16 a bf16 copy can still be faster: it halves the weights read at every step, and a
# one-stream step of a big model is bound by that traffic (measured on an AVX2-only 2-core EPYC, `charrnn
# bench`: 2x512 LSTM, one stream, raw LSTMCell loop fp32 337 chars/s, bf16 900). For small models the
# conversions cost more than the traffic saved, so there only models this big are measured at all.
EMULATED_MIN_PARAMS = 1_000_000
# bf16 is kept only when at least this much faster: a near-tie is not worth bf16's rounding, and its speed
# can vary more. On a 2-core EPYC, one stream of a 2x512 LSTM through aten's matmuls stepped at 0.22 ms in
# fp32 in every process and at 0.22 or 0.30 ms in bf16 (2 threads), depending on the process, which the
# measurement of another cannot see. Through oneDNN's linear (model.py, `_packed_weights`) it steps at 0.14 ms
# in bf16 and 0.18 in fp32 in every process (1.25-1.28x; whole samples 1.20x), and 64 streams 1.7-1.8x faster.
BF16_MARGIN = 1.15

Measured = Callable[[str, dict], None]  # (cache key, what was measured): told when auto had to measure


def cache_file() -> Path:
    from charrnn.cache import measurement_file

    return measurement_file("precision")


# In every key, so that a choice the earlier timing (rounds of 6 steps, best of 3) cached is timed again.
TIMING = "timing 2"


def cache_key(model, rows: int) -> str:
    """The machine (CPU, torch, threads) and the shape sampled (cell, sizes, streams): what the speeds depend on."""
    c = model.config
    return (f"{c.cell} {c.layers}x{c.hidden} embed {c.embed_dim} vocab {c.vocab_size} rows {rows} | "
            f"{machine_key()} | {TIMING}")


def cached_choice(key: str, path: Path | None = None) -> str | None:
    from charrnn.cache import read_measurements

    entry = read_measurements("precision", path).get(key)
    choice = entry.get("precision") if isinstance(entry, dict) else None
    return choice if choice in ("fp32", "bf16") else None


def remember(key: str, entry: dict, path: Path | None = None) -> None:
    """Add one choice to the cache file, atomically (temp file, rename); a cache that cannot be written is skipped."""
    from charrnn.cache import remember_measurement

    remember_measurement("precision", key, entry, path)


@torch.no_grad()
def _seconds_per_step(model, rows: int, steps: int, seconds: float = 0.0) -> float:
    """Seconds per step over at least `steps` steps and at least `seconds` (the state fed back, as sampling does)."""
    device = model.head.weight.device
    state = model.init_state(rows, device)
    idx = torch.zeros(rows, dtype=torch.long, device=device)
    done, t0 = 0, time.perf_counter()
    while done < steps or time.perf_counter() - t0 < seconds:
        logits, state = model.step(idx, state)
        logits.float()  # what the sampler does with them, so bf16 pays its conversion too
        done += 1
    return (time.perf_counter() - t0) / done


def measure(model, rows: int) -> dict:
    """Seconds per step of `model` (fp32, eval mode) and of a bf16 copy, `rows` streams, alternated; each the
    median of ROUNDS rounds."""
    from charrnn.sample import with_precision

    models = {"fp32": model, "bf16": with_precision(model, "bf16")}  # the copy sampling then uses, if it wins
    try:
        for m in models.values():
            _seconds_per_step(m, rows, WARMUP_STEPS)
    except RuntimeError:  # a CPU whose kernels refuse bf16 for this cell: fp32, never an error
        return {"fp32_s_per_step": _seconds_per_step(model, rows, MIN_STEPS), "bf16_s_per_step": float("inf"),
                "precision": "fp32", "measured_at": time.time()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, m in models.items():
            _seconds_per_step(m, rows, WARMUP_STEPS, WARMUP_SECONDS)  # its weights back in the cache the other took
            times[name].append(_seconds_per_step(m, rows, MIN_STEPS, ROUND_SECONDS))
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"fp32_s_per_step": fp32, "bf16_s_per_step": bf16,
            "precision": "bf16" if bf16 * BF16_MARGIN <= fp32 else "fp32", "measured_at": time.time()}


def auto_precision(model, rows: int, native_bf16: bool | None = None, on_measure: Measured | None = None) -> str:
    """'fp32' or 'bf16' for sampling `rows` streams from `model` (fp32, eval mode) where it lives.

    fp32 on GPUs, and for models under EMULATED_MIN_PARAMS on CPUs without native bf16 (`native_bf16`
    None: this CPU, per cpu_has_bf16). Otherwise the cached choice for this machine and shape, or, the
    first time, the faster of the two measured (`on_measure(key, result)` is told) and cached.
    """
    if model.head.weight.device.type != "cpu":
        return "fp32"
    native = cpu_has_bf16() if native_bf16 is None else native_bf16
    if not native and model.num_params() < EMULATED_MIN_PARAMS:
        return "fp32"
    key = cache_key(model, rows)
    choice = cached_choice(key)
    if choice is not None:
        return choice
    result = measure(model, rows)
    if on_measure is not None:
        on_measure(key, result)
    remember(key, result)
    return result["precision"]
