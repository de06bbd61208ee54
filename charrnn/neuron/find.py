"""Finding the sentiment unit: labeled examples, L1 logistic regression on final states, the chosen unit.

This follows Radford et al. 2017: the final state of each labeled text is a feature vector, an
L1-regularised logistic regression (FISTA on standardised features, strength chosen on a
validation split) ranks units by |weight|, and the best unit is then fitted alone.
`find_sentiment_unit` is the whole of `neuron find`; the CLI renders what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from charrnn.data import Vocab, read_labeled
from charrnn.errors import DataError
from charrnn.neuron.states import final_states
from charrnn.neuron.steer import check_unit, default_state

FIX_QUANTILE = 0.9  # fix values: this quantile of the unit on its side's texts (0.1 on the other side)
N_LAMBDAS = 12  # regularisation strengths swept, log-spaced below the one that zeroes every weight
TOP_CANDIDATES = 8  # units (largest |weight|) each fitted alone; the best on validation is chosen
SPLIT_FRAC = 0.2  # the share of LABELED held out for validation, and again for testing, when not given


# ---------------------------------------------------------------- labeled examples


@dataclass
class Examples:
    """Labeled texts ready for a model: unknown characters removed (and reported), empty texts dropped."""

    texts: list[str]
    labels: torch.Tensor  # (N,) float 0/1
    unknown: str = ""  # characters the model never saw, removed from the texts
    dropped: int = 0  # texts left empty once those were removed


def load_examples(path: Path, vocab: Vocab, need_both: bool = True) -> Examples:
    """A labeled TSV, checked: both classes present; characters unknown to `vocab` removed."""
    lab = read_labeled(Path(path))
    known = set(vocab.chars)
    unknown: dict[str, None] = {}
    texts, labels, dropped = [], [], 0
    for t, y in zip(lab.texts, lab.labels):
        kept = "".join(c for c in t if c in known)
        if len(kept) != len(t):
            unknown.update(dict.fromkeys(c for c in t if c not in known))
        if not kept:
            dropped += 1
            continue
        texts.append(kept)
        labels.append(y)
    if need_both and len(set(labels)) < 2:
        only = "positive" if labels and labels[0] == 1 else "negative"
        raise DataError(f"{path}: every example is {only}; neuron find needs both positive and negative examples")
    return Examples(texts, torch.tensor(labels, dtype=torch.float32), "".join(unknown), dropped)


def split_examples(n: int, fracs: tuple[float, ...], seed: int = 0) -> list[torch.Tensor]:
    """Shuffle indices 0..n-1 (seeded) and cut them into consecutive parts of the given fractions (the rest last)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    out, start = [], 0
    for f in fracs:
        k = max(1, int(round(n * f)))
        out.append(perm[start : start + k])
        start += k
    out.append(perm[start:])
    return out


def take(states: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in states.items()}


# ---------------------------------------------------------------- L1 logistic regression


def _soft(w: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0.0)


def fit_l1(X: torch.Tensor, y: torch.Tensor, lam: float, init=None, iters: int = 400):
    """min mean BCE(Xw + b, y) + lam * |w|_1 by FISTA (proximal gradient with momentum); returns (w, b)."""
    n, d = X.shape
    lip = float(torch.linalg.matrix_norm(X, 2)) ** 2 / (4 * n) + 1e-8  # Lipschitz constant of the gradient
    step = 1.0 / lip
    w, b = (init if init is not None else (torch.zeros(d, dtype=X.dtype), torch.zeros((), dtype=X.dtype)))
    zw, zb, t = w.clone(), b.clone(), 1.0
    for _ in range(iters):
        r = torch.sigmoid(X @ zw + zb) - y  # (N,)
        w_new = _soft(zw - step * (X.T @ r) / n, step * lam)
        b_new = zb - step * r.mean()
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        zw = w_new + (t - 1) / t_new * (w_new - w)
        zb = b_new + (t - 1) / t_new * (b_new - b)
        w, b, t = w_new, b_new, t_new
    return w, b


def accuracy(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b) -> float:
    return float(((X @ w + b > 0).to(y.dtype) == y).float().mean())


def fit_single(x: torch.Tensor, y: torch.Tensor, iters: int = 300) -> tuple[float, float]:
    """Logistic regression on one standardised feature (Newton steps, tiny L2 for separable data): (w, b)."""
    w, b = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    x, y = x.double(), y.double()
    for _ in range(50):
        p = torch.sigmoid(w * x + b)
        g = torch.stack([((p - y) * x).mean() + 1e-4 * w, (p - y).mean()])
        s = p * (1 - p)
        hess = torch.tensor([[float((s * x * x).mean()) + 1e-4, float((s * x).mean())],
                             [float((s * x).mean()), float(s.mean()) + 1e-9]], dtype=torch.float64)
        delta = torch.linalg.solve(hess, g)
        w, b = w - delta[0], b - delta[1]
        if float(delta.abs().max()) < 1e-8:
            break
    return float(w), float(b)


def _single_accuracy(x: torch.Tensor, y: torch.Tensor, w1: float, b1: float) -> float:
    return float((((w1 * x + b1) > 0).double() == y).double().mean())


# ---------------------------------------------------------------- the unit


@dataclass
class FindResult:
    unit: int  # index within its layer
    layer: int  # layer index (0-based); the top layer unless all layers were searched
    state: str  # 'c' or 'h'
    polarity: int  # +1: higher values mean positive
    single_unit_accuracy: float  # on the test set
    all_units_accuracy: float  # the L1 model over every unit, on the test set
    val_single_unit_accuracy: float
    val_all_units_accuracy: float
    lam: float  # chosen regularisation strength
    nonzero: int  # units with a non-zero weight at that strength
    rank: int  # the unit's place by |weight| (1 = largest)
    test_examples: int
    fit_examples: int
    fix_values: dict  # {'positive': v, 'negative': v}: where `sample --sentiment` fixes the unit
    top_units: list = field(default_factory=list)  # [(layer, unit, weight)] largest |weight| first
    sweep: list = field(default_factory=list)  # [(lam, nonzero, val accuracy)]
    logistic: dict = field(default_factory=dict)  # the unit's own fit on its raw value: {'slope', 'intercept'}

    def record(self, source: str, **extra) -> dict:
        """The checkpoint's unit record (see charrnn.neuron.steer)."""
        return {"unit": self.unit, "layer": self.layer, "state": self.state, "polarity": self.polarity,
                "fix_values": dict(self.fix_values), "source": source,
                "single_unit_accuracy": self.single_unit_accuracy, "all_units_accuracy": self.all_units_accuracy,
                "test_examples": self.test_examples,
                **({"logistic": {**self.logistic, "fitted_on": "find"}} if self.logistic else {}), **extra}


def fix_values_of(values: torch.Tensor, labels: torch.Tensor, polarity: int, q: float = FIX_QUANTILE) -> dict:
    """Fix values from the unit's observed range: the q-quantile in the positive direction on positive
    texts, and the same in the negative direction on negative texts."""
    pos, neg = values[labels == 1].float(), values[labels == 0].float()
    hi, lo = q, 1.0 - q
    return {"positive": float(torch.quantile(pos, hi if polarity > 0 else lo)),
            "negative": float(torch.quantile(neg, lo if polarity > 0 else hi))}


def raw_logistic(w: float, b: float, mu: float, sd: float) -> dict:
    """A logistic fit on the standardised value z = (x - mu) / sd, as slope and intercept on the raw value x
    (what `neuron score` applies to a unit's final value: P(positive) = sigmoid(slope * x + intercept))."""
    return {"slope": w / sd, "intercept": b - w * mu / sd}


def fit_logistic(values: torch.Tensor, labels: torch.Tensor) -> dict:
    """{'slope', 'intercept'} of a one-unit logistic regression of `labels` (0/1) on raw `values`."""
    x = values.double()
    mu, sd = float(x.mean()), float(x.std().clamp_min(1e-6))
    return raw_logistic(*fit_single((x - mu) / sd, labels.double()), mu, sd)


def p_positive(logistic: dict, values: torch.Tensor) -> torch.Tensor:
    """P(positive) of each final value under a stored fit (see raw_logistic)."""
    return torch.sigmoid(logistic["slope"] * values.double() + logistic["intercept"])


def _features(states: dict, state: str, layers: list[int]) -> torch.Tensor:
    s = states[state][:, layers, :]  # (N, L, H)
    return s.reshape(s.shape[0], -1)


def _sweep(Ztr, ytr, Zva, yva):
    """The L1 path, strongest first, each fit warm-started from the last: the best fit on validation
    (accuracy, lam, w, b) and the path [(lam, nonzero, accuracy)]."""
    lam_max = float((Ztr.T @ (ytr - ytr.mean())).abs().max()) / len(ytr)
    lams = [lam_max * 10 ** (-3.0 * i / (N_LAMBDAS - 1)) for i in range(N_LAMBDAS)]
    best, init, sweep = None, None, []
    for lam in lams:
        w, b = fit_l1(Ztr, ytr, lam, init)
        init = (w, b)
        acc = accuracy(Zva, yva, w, b)
        nz = int((w != 0).sum())
        sweep.append((lam, nz, acc))
        if nz and (best is None or acc > best[0] + 1e-12):
            best = (acc, lam, w.clone(), b.clone())
    if best is None:
        raise DataError("the labels could not be predicted from any unit (every weight stayed zero); "
                        "use more labeled examples or a better-trained model")
    return best, sweep


def find_unit(train: dict, y_train: torch.Tensor, val: dict, y_val: torch.Tensor, test: dict, y_test: torch.Tensor,
              state: str, layers: list[int], neuron: int | None = None) -> FindResult:
    """Rank units with an L1 logistic regression and fit the best alone. Each dict holds final_states output.

    `neuron` (a unit of the last layer in `layers`, checked by the caller: steer.check_unit) skips the
    choice and scores that unit.
    """
    Xtr, Xva, Xte = (_features(s, state, layers).double() for s in (train, val, test))
    mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
    Ztr, Zva, Zte = ((X - mu) / sd for X in (Xtr, Xva, Xte))
    ytr, yva, yte = y_train.double(), y_val.double(), y_test.double()
    (val_all, lam, w, b), sweep = _sweep(Ztr, ytr, Zva, yva)
    H = train[state].shape[2]
    order = torch.argsort(w.abs(), descending=True)
    top = [(layers[int(j) // H], int(j) % H, float(w[j])) for j in order[:TOP_CANDIDATES] if w[j] != 0]
    if neuron is not None:
        cands = [(len(layers) - 1) * H + neuron]
    else:
        cands = [int(j) for j in order[:TOP_CANDIDATES] if w[j] != 0]
    chosen = None
    for j in cands:  # each candidate fitted alone; the best on the validation split wins
        w1, b1 = fit_single(Ztr[:, j], ytr)
        acc = _single_accuracy(Zva[:, j], yva, w1, b1)
        if chosen is None or acc > chosen[0]:
            chosen = (acc, j, w1, b1)
    val_single, j, w1, b1 = chosen
    polarity = 1 if w1 >= 0 else -1
    return FindResult(
        unit=j % H, layer=layers[j // H], state=state, polarity=polarity,
        single_unit_accuracy=_single_accuracy(Zte[:, j], yte, w1, b1), all_units_accuracy=accuracy(Zte, yte, w, b),
        val_single_unit_accuracy=val_single, val_all_units_accuracy=val_all, lam=lam,
        nonzero=int((w != 0).sum()), rank=int((w.abs() > w[j].abs()).sum()) + 1, test_examples=len(yte),
        fit_examples=len(ytr), fix_values=fix_values_of(Xtr[:, j], y_train, polarity), top_units=top, sweep=sweep,
        logistic=raw_logistic(w1, b1, float(mu[j]), float(sd[j])),
    )


def find_sentiment_unit(model, vocab: Vocab, labeled_path: Path, test_path: Path | None = None,
                        val_path: Path | None = None, state: str | None = None, all_layers: bool = False,
                        neuron: int | None = None, seed: int = 0,
                        on_warn: Callable[[str], None] | None = None) -> FindResult:
    """`neuron find`: fit on LABELED, choose the regularisation on `val_path` and score on `test_path`
    (each, when not given, a seeded SPLIT_FRAC split of LABELED). `state` defaults to c (h for GRU/RNN);
    `on_warn` hears about characters the model never saw, which are skipped."""
    which = state or default_state(model)
    check_unit(model, neuron, which)

    def examples(path: Path) -> Examples:
        ex = load_examples(path, vocab)
        if ex.unknown and on_warn is not None:
            on_warn(f"{path}: characters the model never saw were skipped: {ex.unknown[:20]!r}"
                    + (f"; {ex.dropped} text(s) left empty were dropped" if ex.dropped else ""))
        return ex

    ex = examples(labeled_path)
    feats, y = final_states(model, vocab, ex.texts), ex.labels
    parts = split_examples(len(y), tuple([SPLIT_FRAC] * ((val_path is None) + (test_path is None))), seed)
    fit_idx, held = parts[-1], iter(parts)
    sets = {}
    for name, given in (("val", val_path), ("test", test_path)):
        if given is not None:
            e = examples(given)
            sets[name] = (final_states(model, vocab, e.texts), e.labels)
        else:
            idx = next(held)
            sets[name] = (take(feats, idx), y[idx])
    if len(set(y[fit_idx].tolist())) < 2:
        raise DataError(f"{labeled_path}: too few examples of one class to fit on; add more labeled examples")
    layers = list(range(model.config.layers)) if all_layers else [model.config.layers - 1]
    return find_unit(take(feats, fit_idx), y[fit_idx], *sets["val"], *sets["test"], which, layers, neuron)
