"""Where `sample --num 64` spends its time against one stream: generate() and the bare model.step loop,
at 1 and 64 rows, alternated in one process (fp32, random weights; speed does not depend on them).

    python benchmarks/sample_batch.py --hidden 512 --length 200 --batched-length 50 --threads 1
"""

import argparse
import os
import statistics
import time

import torch

from charrnn.data import Vocab
from charrnn.model import CharRNN, ModelConfig
from charrnn.sample import SampleConfig, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--length", type=int, default=200, help="characters per one-stream measurement")
    ap.add_argument("--batched-length", type=int, default=50, help="characters per stream, batched measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vocab = Vocab("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=a.layers, hidden=a.hidden)).eval()

    def gen(num: int, length: int) -> float:
        t0 = time.perf_counter()
        generate(model, vocab, SampleConfig(temperature=0.8, length=length, seed=0, num=num, precision="fp32"))
        return num * length / (time.perf_counter() - t0)

    @torch.no_grad()
    def steps(num: int, length: int) -> float:
        state, idx = model.init_state(num), torch.zeros(num, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(length):
            _, state = model.step(idx, state)
        return num * length / (time.perf_counter() - t0)

    got: dict[str, list[float]] = {"generate 1": [], f"generate {a.num}": [], "step 1": [], f"step {a.num}": []}
    for _ in range(a.rounds):
        got["generate 1"].append(gen(1, a.length))
        got[f"generate {a.num}"].append(gen(a.num, a.batched_length))
        got["step 1"].append(steps(1, a.length))
        got[f"step {a.num}"].append(steps(a.num, a.batched_length))
    med = {k: statistics.median(v) for k, v in got.items()}
    for k, v in med.items():
        print(f"{k:12s} {v:12,.0f} chars/s")
    print(f"generate {a.num}/1: {med[f'generate {a.num}'] / med['generate 1']:.1f}x; "
          f"step {a.num}/1: {med[f'step {a.num}'] / med['step 1']:.1f}x; "
          f"generate/step at {a.num} rows: {med[f'generate {a.num}'] / med[f'step {a.num}']:.2f}")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
