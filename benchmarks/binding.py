"""What binding costs: training chars/s of `train --sentiment-unit` against the same run without it.

Usage: python benchmarks/binding.py LABELED.tsv [--cells lstm,gru --hidden 256 --steps 30 --rounds 3 --threads 1]

For each cell, three runs of charrnn's own training loop (the code `charrnn train` runs) on the same
labeled corpus and shape, in alternated rounds (plain, bound, bound + contrast, plain, ...), the
median round kept:
- plain: no binding;
- bound: the unit held at its written value (fixed reviews) or 0, and the reading loss, the contrast off;
- bound + contrast: the same with the contrast's second pass of the top layer on from the first step
  (a default run has it from a tenth of its steps on).
Each row gives chars/s and the ratio to the same cell's plain run, so what the binding and its contrast
cost can be weighed against what they buy (docs/sentiment.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from charrnn.config import SentimentConfig, TrainConfig
from charrnn.train import Trainer

VARIANTS = {
    "plain": None,
    "bound": SentimentConfig(unit=True, contrast=0.0),
    "bound + contrast": SentimentConfig(unit=True, contrast_from=0.0),
}


def speed(corpus: Path, cell: str, hidden: int, steps: int, sentiment: SentimentConfig | None, folder: Path) -> float:
    cfg = TrainConfig(cell=cell, layers=2, hidden=hidden, steps=steps, eval_every=10**9, eval_chars=2000,
                      warmup_steps=1, sentiment=sentiment or SentimentConfig())
    trainer = Trainer.new([corpus], cfg, run_dir=folder)
    return trainer.run()["chars_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path, help="a labeled TSV (label<TAB>text per line)")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cells = [c.strip() for c in a.cells.split(",") if c.strip()]
    found: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for cell in cells:
                for name, sc in VARIANTS.items():
                    folder = Path(tmp) / f"{cell}-{name.replace(' + ', '-')}-{r}"
                    found.setdefault((cell, name), []).append(speed(a.corpus, cell, a.hidden, a.steps, sc, folder))
    print(f"2x{a.hidden}, seq 64 x batch 32, {a.steps} steps, {a.threads} thread(s), median of {a.rounds} rounds, "
          f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print(f"{'cell':6s} {'run':18s} {'chars/s':>9s} {'vs plain':>9s}")
    for cell in cells:
        plain = statistics.median(found[(cell, "plain")])
        for name in VARIANTS:
            cps = statistics.median(found[(cell, name)])
            print(f"{cell:6s} {name:18s} {cps:9,.0f} {cps / plain:9.2f}")


if __name__ == "__main__":
    main()
