"""Which precision a run trains in (train --precision): chosen once when the run starts, kept in its RunState.

fp32 runs everything in fp32. bf16 runs the forward pass under bf16 autocast; weights, gradients
and the optimiser state stay fp32, and the loss is computed in fp32 (device.Precision does the
step). `auto`:
- on a CPU with native bf16 (AVX512-BF16 or AMX) it times a few forward-backward passes of a copy
  of the model at the run's batch, fp32 and bf16 alternated (about a second), and keeps bf16 only
  when it is clearly faster;
- on a CPU without native bf16 it is fp32, and bf16 is not even tried: there oneDNN has no bf16 LSTM
  kernel (autocast fails with "could not create a primitive descriptor for the LSTM forward
  propagation primitive"), and the cells it can run, emulated, ran at 0.4-0.5x fp32 (docs/speed.md);
- on CUDA it is bf16 autocast where the card has bf16, else fp16 with a loss scaler, as before.
An explicit `--precision bf16` on a CPU without native bf16 is refused in one line for the same
reasons: it would crash (LSTM) or train slower than fp32 (the other cells), never faster.

A resumed run trains in the precision it recorded, so it goes on exactly as if it had never
stopped; `--precision` given with --resume switches it (from then on, no longer bit-exact).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from charrnn.config import PRECISIONS
from charrnn.device import Precision, cpu_has_bf16
from charrnn.errors import CharRNNError, CheckpointError, UsageError
from charrnn.model import CharRNN

# bf16 rounds every product: auto takes it only when it is measurably faster, not within the
# few percent that two timings of the same thing differ by on a shared machine.
BF16_MIN_SPEEDUP = 1.05
MEASURE_SECONDS = 1.0  # timed passes stop after this long (at least MEASURE_MIN_ROUNDS of each)
MEASURE_MIN_ROUNDS, MEASURE_MAX_ROUNDS = 2, 8
# time steps of a measured pass (the run's seq_len if shorter): the cost per character hardly
# depends on the window's length, and a short window keeps the measurement short for wide models
MEASURE_SEQ = 32
NO_NATIVE_BF16 = ("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 training "
                  "would fail (LSTM) or run slower than fp32; use --precision fp32 or auto")


@dataclass(frozen=True)
class Choice:
    """The precision a run trains in, and why (shown when the run starts)."""

    name: str  # "fp32", "bf16" or "fp16"
    why: str  # e.g. "auto: bf16 measured 1.52x fp32"


def check_available(asked: str, device: torch.device) -> None:
    """Refuse, in one line, a --precision that `device` cannot train in (before anything is written)."""
    if asked not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {asked!r})")
    if asked != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bf16; use --precision auto (fp16 with a loss scaler) or fp32")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--precision bf16 trains on a CPU with native bf16 or on CUDA, not on {device.type}; "
                         "use --precision fp32")
    if device.type == "cpu" and not cpu_has_bf16():
        raise UsageError(NO_NATIVE_BF16)


def choose(asked: str, device: torch.device, model: CharRNN, batch: int, seq_len: int) -> Choice:
    """The precision of a new run from --precision `asked` (auto, fp32 or bf16) on `device`."""
    check_available(asked, device)
    if asked == "fp32":
        return Choice("fp32", "asked")
    if device.type == "cuda":
        name = Precision(device).name if asked == "auto" else "bf16"
        return Choice(name, "auto: CUDA mixed precision" if asked == "auto" else "asked")
    if device.type != "cpu":
        return Choice("fp32", f"auto: fp32 on {device.type}")
    if not cpu_has_bf16():
        return Choice("fp32", "auto: this CPU has no native bf16")
    if asked == "bf16":
        _check_bf16_runs(model, device)
        return Choice("bf16", "asked")
    measured = measure(model, batch, seq_len, device)
    if measured is None:
        return Choice("fp32", "auto: bf16 does not run this model here")
    fp32_s, bf16_s = measured
    speedup = fp32_s / bf16_s
    name = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return Choice(name, f"auto: bf16 measured {speedup:.2f}x fp32")


def for_resume(recorded: str | None, asked: str | None, device: torch.device, model: CharRNN, batch: int,
               seq_len: int) -> Choice:
    """The precision a resumed run goes on in: the one it `recorded`, or `asked` (--precision with --resume)."""
    if asked is not None:
        new = choose(asked, device, model, batch, seq_len)
        if recorded is not None and new.name != recorded:
            return Choice(new.name, f"{new.why}; switched from the run's {recorded}, so no longer bit-exact")
        return new
    if recorded is None:  # a run from before the precision was recorded: what it used then
        return Choice(Precision(device).name, "as the run trained before")
    switch = "or add --precision fp32 to go on in fp32 (no longer bit-exact)"
    if recorded == "fp16" and device.type != "cuda":
        raise CheckpointError(f"this run trains in fp16 mixed precision, which runs on CUDA only; resume it on a "
                              f"CUDA GPU, {switch}")
    if recorded == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            raise CheckpointError("this run trains in bf16 and this CPU has no native bf16 (AVX512-BF16 or AMX); "
                                  f"resume it on a CPU that has, {switch}")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise CheckpointError(f"this run trains in bf16 and this GPU has no bf16; resume it where it has, {switch}")
        if device.type not in ("cpu", "cuda"):
            raise CheckpointError(f"this run trains in bf16, which runs on a CPU or CUDA, not on {device.type}; {switch}")
    return Choice(recorded, "the run's own")


def measure(model: CharRNN, batch: int, seq_len: int, device: torch.device) -> tuple[float, float] | None:
    """Seconds of one forward-backward pass in (fp32, bf16): the fastest of a few, alternated, on a copy of
    `model`; None when the bf16 pass fails. The run's weights and random stream are left as they were."""
    probe = copy.deepcopy(model).train()  # its gradients and dropout are the copy's own
    seq = min(seq_len, MEASURE_SEQ)
    with torch.random.fork_rng(devices=[]):  # dropout and the ids below draw from a stream thrown away after
        idx = torch.randint(model.config.vocab_size, (batch, seq + 1), device=device)
        state = probe.init_state(batch, device)
        times: dict[bool, list[float]] = {False: [], True: []}
        _pass(probe, idx, state, False)  # the first passes build the kernels' primitives: not timed
        try:
            _pass(probe, idx, state, True)
        except RuntimeError:  # a kernel without bf16 support on this CPU (or its out-of-memory)
            return None
        start = time.perf_counter()
        while len(times[True]) < MEASURE_MAX_ROUNDS and (
                len(times[True]) < MEASURE_MIN_ROUNDS or time.perf_counter() - start < MEASURE_SECONDS):
            for bf16 in times:
                times[bf16].append(_pass(probe, idx, state, bf16))
    return min(times[False]), min(times[True])


def _pass(model: CharRNN, idx: torch.Tensor, state: tuple, bf16: bool) -> float:
    """Seconds of one forward-backward pass of the language-model loss, as a training step runs it."""
    t0 = time.perf_counter()
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=bf16):
        _, loss, _ = model(idx[:, :-1], idx[:, 1:], state)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _check_bf16_runs(model: CharRNN, device: torch.device) -> None:
    """One tiny bf16 pass on a copy of the model: a kernel that cannot run bf16 fails here in one line,
    not with a traceback at the first step."""
    probe = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        idx = torch.randint(model.config.vocab_size, (2, 3), device=device)
        try:
            _pass(probe, idx, probe.init_state(2, device), True)
        except RuntimeError as e:
            first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise CharRNNError(f"--precision bf16 does not run this model on this CPU ({first}); "
                               "use --precision fp32") from None
