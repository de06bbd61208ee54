"""Reading probe: how well can ONE unit of a trained model learn to read sentiment, given all the help?

Trains the whole model on a single objective, a logistic loss on the sentiment unit's cell state
after the last character of each labeled sentence (the value `neuron find` reads), and prints the
unit's accuracy on a development set as it goes. It is an upper bound for what the binding's
reading pass can reach in the same time on the same data, not a way to make a model (nothing is
saved): the language model is not trained meanwhile.

    python benchmarks/reading_probe.py RUN --train sst2_train.tsv [uci_*.tsv ...] --dev sst2_dev.tsv [--minutes 8]
        [--chars 256: long reviews cut to their last 256 characters] [--steps N: stop after N steps]
        [--dropout P: dropout between the layers while training] [--weight-decay W: AdamW's]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    from charrnn import checkpoint as ckm
    from charrnn import neuron as sm
    from charrnn.config import SentimentConfig
    from charrnn.neuron.find import load_examples
    from charrnn.neuron.states import text_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--train", type=Path, nargs="+", required=True)
    ap.add_argument("--dev", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=100, help="steps between dev evaluations")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chars", type=int, default=0, help="train on the last CHARS characters of each text (0: whole)")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: only the time limit)")
    ap.add_argument("--dropout", type=float, default=None, help="dropout between layers while training (default: the run's)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, vocab, ck = ckm.load_model(args.checkpoint)
    if args.dropout is not None:
        model.drop.p = args.dropout
        if hasattr(model, "rnn"):
            model.rnn.dropout = args.dropout
    rec = sm.upgrade_record(ck.get("sentiment")) or {}
    unit = rec.get("unit", sm.BOUND_UNIT)
    # the logit scale of the binding's reading loss (tanh of the fixed value for h, without a cell state)
    scale = sm.reading_scale(model, rec.get("train_value", SentimentConfig.value))

    def load(paths, chars=0):
        seqs, ys = [], []
        for p in paths:
            ex = load_examples(p, vocab)
            seqs += [text_ids(t[-chars:] if chars else t, vocab) for t in ex.texts]
            ys += ex.labels.tolist()
        return seqs, torch.tensor(ys)

    train, y_train = load(args.train, args.chars)
    dev, y_dev = load([args.dev])  # dev texts whole, as `neuron find` reads them

    def values(seqs):
        return sm.unit_at_ends(model, seqs, "cpu", unit)

    @torch.no_grad()
    def dev_accuracy() -> float:
        model.eval()
        v = torch.cat([values(dev[i : i + 256]) for i in range(0, len(dev), 256)])
        model.train()
        return ((v > 0).float() == y_dev).float().mean().item()

    print(f"{len(train)} training texts, {len(dev)} dev; unit {unit}; dev accuracy at the start "
          f"{dev_accuracy():.3f}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    t0, step, best = time.perf_counter(), 0, 0.0
    order = list(range(len(train)))
    def done() -> bool:
        return time.perf_counter() - t0 >= args.minutes * 60 or (args.steps and step >= args.steps)

    while not done():
        rng.shuffle(order)
        for b0 in range(0, len(order) - args.batch + 1, args.batch):
            rows = order[b0 : b0 + args.batch]
            v = values([train[i] for i in rows])
            loss = F.binary_cross_entropy_with_logits(scale * v, y_train[rows])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.every == 0:
                acc = dev_accuracy()
                best = max(best, acc)
                print(f"{time.perf_counter() - t0:6.0f}s  step {step:5d}  loss {loss.item():.3f}  dev {acc:.3f}", flush=True)
            if done():
                break
    last = dev_accuracy()
    print(f"best dev accuracy {max(best, last):.3f}; last {last:.3f} after {step} steps")


if __name__ == "__main__":
    main()
