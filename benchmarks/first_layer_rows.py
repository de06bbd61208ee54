"""Layer 0 of a sampling step two ways, alternated in one process: the character's row gathered from the
folded table with the biases in it (what `model.step` does now), against a one-hot row multiplied by the
table with both biases added by `torch.lstm_cell` (what it did before). LSTM, random weights.

    python benchmarks/first_layer_rows.py --hidden 512 --rounds 7 --steps 200
"""

import argparse
import copy
import statistics
import time

import torch

from charrnn.model import CharRNN, ModelConfig


def one_hot_step(model: CharRNN, idx: torch.Tensor, state, eye: torch.Tensor, table: torch.Tensor):
    """The step before the change: a one-hot row through the (4H, V) table, the biases added per layer."""
    weights, hs, cs = model.rnn._flat_weights, [], []
    x = eye[idx]
    for layer in range(model.config.layers):
        w_ih, w_hh, b_ih, b_hh = weights[4 * layer:4 * layer + 4]
        h, c = torch.lstm_cell(x, (state[0][layer], state[1][layer]), table if layer == 0 else w_ih, w_hh, b_ih, b_hh)
        hs.append(h)
        cs.append(c)
        x = h
    return model.head(x), (torch.stack(hs), torch.stack(cs))


def steps_per_s(step, model: CharRNN, rows: int, steps: int) -> float:
    state, idx = model.init_state(rows), torch.randint(0, model.config.vocab_size, (rows,))
    for _ in range(10):
        _, state = step(idx, state)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, state = step(idx, state)
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    torch.manual_seed(0)
    base = CharRNN(ModelConfig(vocab_size=a.vocab, cell="lstm", layers=a.layers, hidden=a.hidden)).eval()
    for dtype in (torch.bfloat16, torch.float32):
        model = copy.deepcopy(base).to(dtype)
        eye = torch.eye(a.vocab, dtype=dtype)
        table = (model.rnn.weight_ih_l0.float() @ model.embedding.weight.float().t()).to(dtype).contiguous()
        for rows in (1, 64):
            old, new = [], []
            for _ in range(a.rounds):
                old.append(steps_per_s(lambda i, s: one_hot_step(model, i, s, eye, table), model, rows, a.steps))
                new.append(steps_per_s(model.step, model, rows, a.steps))
            ratios = sorted(n / o for n, o in zip(new, old))
            print(f"{str(dtype)[6:]} rows {rows}: one-hot {statistics.median(old):,.0f} steps/s, rows "
                  f"{statistics.median(new):,.0f}, ratio {statistics.median(new) / statistics.median(old):.3f} "
                  f"(per round: median {statistics.median(ratios):.2f}, {ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


if __name__ == "__main__":
    main()
