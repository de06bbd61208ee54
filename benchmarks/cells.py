"""Training throughput of each cell at the same width: chars/s of forward + backward + Adam step.

Usage: python benchmarks/cells.py [--hidden 256 --layers 2 --seq-len 128 --batch-size 32 --steps 5]

The CPU is shared, so besides wall-clock chars/s it reports chars per CPU-second of this
process (one thread), which is what the cells' relative speed is judged on; cells are run in
interleaved rounds and the median round is kept.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from charrnn.model import CELLS, CharRNN, ModelConfig


def one_round(model, opt, idx, targets, steps: int) -> tuple[float, float]:
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _, loss, _ = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t_wall, time.process_time() - t_cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", default=",".join(CELLS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vocab = 65
    idx = torch.randint(0, vocab, (a.batch_size, a.seq_len))
    targets = torch.randint(0, vocab, (a.batch_size, a.seq_len))
    cells = a.cells.split(",")
    setups = {}
    for cell in cells:
        model = CharRNN(ModelConfig(vocab, cell, a.layers, a.hidden)).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        one_round(model, opt, idx, targets, 1)  # warm-up
        setups[cell] = (model, opt)
    walls: dict[str, list[float]] = {c: [] for c in cells}
    cpus: dict[str, list[float]] = {c: [] for c in cells}
    for _ in range(a.rounds):
        for cell in cells:
            w, c = one_round(*setups[cell], idx, targets, a.steps)
            walls[cell].append(w)
            cpus[cell].append(c)
    chars = a.steps * a.batch_size * a.seq_len
    base = chars / statistics.median(cpus["lstm"]) if "lstm" in cpus else None
    print(f"{a.layers}x{a.hidden}, seq {a.seq_len}, batch {a.batch_size}, {a.threads} thread(s), "
          f"median of {a.rounds} rounds of {a.steps} steps")
    print(f"{'cell':<9} {'params':>9} {'chars/s wall':>13} {'chars/cpu-s':>12} {'vs lstm':>8}")
    for cell in cells:
        cps = chars / statistics.median(cpus[cell])
        rel = f"{cps / base:.2f}" if base else "-"
        print(f"{cell:<9} {setups[cell][0].num_params():>9,} {chars / statistics.median(walls[cell]):>13,.0f} "
              f"{cps:>12,.0f} {rel:>8}")


if __name__ == "__main__":
    main()
