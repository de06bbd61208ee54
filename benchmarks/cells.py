"""Training throughput of each cell at the same width: chars/s of forward + backward + Adam step.

Usage: python benchmarks/cells.py [--hidden 256 --layers 2 --seq-len 128 --batch-size 32 --steps 5]
       python benchmarks/cells.py --cells lstm,mlstm,mlstm-steps --layers 1 --hidden 512 --embed 64 \
           --seq-len 100 --threads 2 --rounds 7     (the mLSTM's speed against the fused LSTM)

The CPU is shared, so besides wall-clock chars/s it reports chars per CPU-second of this
process, which is what the cells' relative speed is judged on; cells are run in interleaved
rounds (A, B, A, B ...), the median round is kept, and the load average is printed with them.
`mlstm-steps` is the mLSTM run through the per-step equations (`recur`, as a hook forces), the
path the whole-sequence autograd.Function replaced: its row shows what that Function buys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from charrnn.model import CELLS, CharRNN, ModelConfig


STEPS_SUFFIX = "-steps"  # `mlstm-steps`: the cell through the per-step equations


def keep(layer, t, state):
    """A hook that changes nothing; any hook sends every layer through `recur`, one step at a time."""
    return state


def one_round(model, opt, idx, targets, steps: int, hook=None) -> tuple[float, float]:
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _, loss, _ = model(idx, targets, hook=hook)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t_wall, time.process_time() - t_cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=0, help="embedding width; 0 means the same as hidden")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", default=",".join(CELLS), help=f"any of {CELLS}, or CELL{STEPS_SUFFIX}")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vocab = 65
    idx = torch.randint(0, vocab, (a.batch_size, a.seq_len))
    targets = torch.randint(0, vocab, (a.batch_size, a.seq_len))
    cells = a.cells.split(",")
    setups = {}
    for cell in cells:
        steps = cell.endswith(STEPS_SUFFIX)
        model = CharRNN(ModelConfig(vocab, cell.removesuffix(STEPS_SUFFIX), a.layers, a.hidden, a.embed)).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        setups[cell] = (model, opt, keep if steps else None)
        one_round(model, opt, idx, targets, 1, setups[cell][2])  # warm-up
    walls: dict[str, list[float]] = {c: [] for c in cells}
    cpus: dict[str, list[float]] = {c: [] for c in cells}
    for _ in range(a.rounds):
        for cell in cells:
            model, opt, hook = setups[cell]
            w, c = one_round(model, opt, idx, targets, a.steps, hook)
            walls[cell].append(w)
            cpus[cell].append(c)
    chars = a.steps * a.batch_size * a.seq_len
    wall_cps = {c: chars / statistics.median(walls[c]) for c in cells}
    cpu_cps = {c: chars / statistics.median(cpus[c]) for c in cells}

    def vs(rates: dict[str, float], cell: str, base: str) -> str:
        return f"{rates[cell] / rates[base]:.2f}" if base in rates and base != cell else "-"

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{a.layers}x{a.hidden}, embed {a.embed or a.hidden}, seq {a.seq_len}, batch {a.batch_size}, "
          f"{a.threads} thread(s), median of {a.rounds} rounds of {a.steps} steps, load average {load} at the end")
    print(f"{'cell':<12} {'params':>9} {'chars/s wall':>13} {'chars/cpu-s':>12} {'vs lstm':>8} {'wall vs lstm':>13} "
          f"{'vs -steps':>10}")
    for cell in cells:
        print(f"{cell:<12} {setups[cell][0].num_params():>9,} {wall_cps[cell]:>13,.0f} {cpu_cps[cell]:>12,.0f} "
              f"{vs(cpu_cps, cell, 'lstm'):>8} {vs(wall_cps, cell, 'lstm'):>13} "
              f"{vs(wall_cps, cell, cell + STEPS_SUFFIX):>10}")


if __name__ == "__main__":
    main()
