"""The sentiment unit: find it (final states + L1 logistic regression), record it, fix it, and bind it in training.

Finding follows Radford et al. 2017: the final state of each labeled text is a feature vector, an
L1-regularised logistic regression (FISTA on standardised features, strength chosen on a
validation split) ranks units by |weight|, and the best unit is then fitted alone. Binding ties
unit `BOUND_UNIT` of the top layer to the labels of a labeled corpus while the language model
trains (see `Binding`). No printing here: the CLI renders what these functions return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from charrnn.data import Vocab, read_labeled
from charrnn.errors import CheckpointError, DataError, UsageError

BOUND_UNIT = 0  # the top-layer unit that `train --sentiment-unit` binds
CLAMP_QUANTILE = 0.9  # clamp values: this quantile of the unit on its side's texts (0.1 on the other side)
LOGIT_SCALE = 4.0  # binding loss: logit = LOGIT_SCALE * value / forced value, so the forced value reads as about 98% sure
N_LAMBDAS = 12  # regularisation strengths swept, log-spaced below the one that zeroes every weight
TOP_CANDIDATES = 8  # units (largest |weight|) each fitted alone; the best on validation is chosen
OBSERVED_KEEP = 4096  # recent chunk-end values per class that a binding keeps for its clamp values


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


# ---------------------------------------------------------------- states


def state_names(model) -> tuple[str, ...]:
    """Names of the state tuple's parts: ('h', 'c') for LSTM-like cells, ('h',) for GRU and RNN."""
    return ("h", "c") if len(model.init_state(1)) == 2 else ("h",)


def default_state(model) -> str:
    return "c" if "c" in state_names(model) else "h"


def reading_scale(model, clamp: float) -> float:
    """The reading losses' logit per unit of the bound unit's value: logit = scale * value, so the
    forced value (c = clamp, or h = tanh(clamp) without a cell state) reads as about 98% sure."""
    return LOGIT_SCALE / (clamp if "c" in state_names(model) else math.tanh(clamp))


def _ids(text: str, vocab: Vocab) -> list[int]:
    stoi = vocab.stoi
    lead = [stoi["\n"]] if "\n" in stoi else []  # a text starts after a newline, as reviews do in training
    return lead + [stoi[c] for c in text]


def run_to_ends(model, seqs: list[list[int]], device) -> list[tuple[torch.Tensor, ...]]:
    """Each id sequence run from the zero state; per sequence, its state after its last id, a tuple of
    (layers, H) tensors (h, or h and c). Differentiable when grad is on.

    Sequences are sorted by length and run as one batch through the plain forward (the fused kernel
    where the cell has one), one segment per distinct length: rows that end are taken out, the rest
    carry on from their state."""
    n = len(seqs)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    lens = [len(seqs[i]) for i in order]
    x = torch.zeros(n, lens[-1], dtype=torch.long)
    for r, i in enumerate(order):
        x[r, : lens[r]] = torch.as_tensor(seqs[i])
    x = x.to(device)
    state = model.init_state(n, device)
    out: list = [None] * n
    pos, first = 0, 0  # characters consumed; first row still running
    while first < n:
        end = lens[first]
        if end > pos:
            _, _, state = model(x[first:, pos:end], state=state)
            pos = end
        stop = first
        while stop < n and lens[stop] == end:
            stop += 1
        for r in range(first, stop):
            out[order[r]] = tuple(s[:, r - first] for s in state)
        state = tuple(s[:, stop - first :].contiguous() for s in state)
        first = stop
    return out


def unit_at_ends(model, seqs: list[list[int]], device, unit: int = BOUND_UNIT) -> torch.Tensor:
    """(N,) float: the top-layer unit's value (c, or h without a cell state: the state `neuron find`
    reads) after each id sequence's last id, run from the zero state (see run_to_ends)."""
    part = state_names(model).index(default_state(model))
    return torch.stack([e[part][-1, unit] for e in run_to_ends(model, seqs, device)]).float()


def final_states(model, vocab: Vocab, texts: list[str], batch_size: int = 128) -> dict[str, torch.Tensor]:
    """The state after each text's last character: {'h': (N, layers, H), 'c': ...} (see run_to_ends)."""
    model.eval()
    device = model.head.weight.device
    names = state_names(model)
    ids = [_ids(t, vocab) for t in texts]
    probe = model.init_state(1, device)
    out = {n: torch.empty(len(ids), probe[0].shape[0], probe[0].shape[2]) for n in names}
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths
    with torch.no_grad():
        for b0 in range(0, len(order), batch_size):
            rows = order[b0 : b0 + batch_size]
            ends = run_to_ends(model, [ids[i] for i in rows], device)
            where = torch.tensor(rows)
            for k, name in enumerate(names):
                out[name][where] = torch.stack([e[k] for e in ends]).float().cpu()
    return out


@torch.no_grad()
def unit_trace(model, vocab: Vocab, text: str, unit: int, layer: int = -1, state: str = "c") -> list[float]:
    """The unit's value after each character of `text` (unknown characters must be removed first)."""
    model.eval()
    names = state_names(model)
    if state not in names:
        raise UsageError(f"this {model.config.cell} model has no '{state}' state; use --state {names[0]}")
    si = names.index(state)
    device = model.head.weight.device
    ids = _ids(text, vocab)
    lead = len(ids) - len(text)
    st = model.init_state(1, device)
    values = []
    for i in ids:
        _, st = model.step(torch.tensor([i], device=device), st)
        values.append(float(st[si][layer, 0, unit]))
    return values[lead:]


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
    clamp: dict  # {'positive': v, 'negative': v}
    top_units: list = field(default_factory=list)  # [(layer, unit, weight)] largest |weight| first
    sweep: list = field(default_factory=list)  # [(lam, nonzero, val accuracy)]

    def record(self, source: str, **extra) -> dict:
        """The checkpoint's "sentiment" entry."""
        return {"unit": self.unit, "layer": self.layer, "state": self.state, "polarity": self.polarity,
                "clamp": dict(self.clamp), "source": source, "single_unit_accuracy": self.single_unit_accuracy,
                "all_units_accuracy": self.all_units_accuracy, "test_examples": self.test_examples, **extra}


def clamp_values(values: torch.Tensor, labels: torch.Tensor, polarity: int, q: float = CLAMP_QUANTILE) -> dict:
    """Clamp values from the unit's observed range: the q-quantile in the positive direction on positive
    texts, and the same in the negative direction on negative texts."""
    pos, neg = values[labels == 1].float(), values[labels == 0].float()
    hi, lo = q, 1.0 - q
    return {"positive": float(torch.quantile(pos, hi if polarity > 0 else lo)),
            "negative": float(torch.quantile(neg, lo if polarity > 0 else hi))}


def _features(states: dict, state: str, layers: list[int]) -> torch.Tensor:
    s = states[state][:, layers, :]  # (N, L, H)
    return s.reshape(s.shape[0], -1)


def find_unit(train: dict, y_train: torch.Tensor, val: dict, y_val: torch.Tensor, test: dict, y_test: torch.Tensor,
              state: str, layers: list[int], neuron: int | None = None) -> FindResult:
    """Rank units with an L1 logistic regression and fit the best alone. Each dict holds final_states output.

    `neuron` (a unit of the last layer in `layers`) skips the choice and scores that unit.
    """
    Xtr, Xva, Xte = (_features(s, state, layers).double() for s in (train, val, test))
    mu, sd = Xtr.mean(0), Xtr.std(0).clamp_min(1e-6)
    Ztr, Zva, Zte = ((X - mu) / sd for X in (Xtr, Xva, Xte))
    ytr, yva, yte = y_train.double(), y_val.double(), y_test.double()
    lam_max = float((Ztr.T @ (ytr - ytr.mean())).abs().max()) / len(ytr)
    lams = [lam_max * 10 ** (-3.0 * i / (N_LAMBDAS - 1)) for i in range(N_LAMBDAS)]
    best, init, sweep = None, None, []
    for lam in lams:  # strongest first, each warm-started from the last
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
    val_all, lam, w, b = best
    test_all = accuracy(Zte, yte, w, b)
    H = train[state].shape[2]
    order = torch.argsort(w.abs(), descending=True)
    top = [(layers[int(j) // H], int(j) % H, float(w[j])) for j in order[:TOP_CANDIDATES] if w[j] != 0]
    if neuron is not None:
        if not 0 <= neuron < H:
            raise UsageError(f"--neuron {neuron} is out of range; this model has {H} units per layer")
        cands = [(len(layers) - 1) * H + neuron]
    else:
        cands = [int(j) for j in order[:TOP_CANDIDATES] if w[j] != 0]
    chosen = None
    for j in cands:  # each candidate fitted alone; the best on the validation split wins
        w1, b1 = fit_single(Ztr[:, j], ytr)
        acc = float((((w1 * Zva[:, j] + b1) > 0).double() == yva).double().mean())
        if chosen is None or acc > chosen[0]:
            chosen = (acc, j, w1, b1)
    val_single, j, w1, b1 = chosen
    test_single = float((((w1 * Zte[:, j] + b1) > 0).double() == yte).double().mean())
    polarity = 1 if w1 >= 0 else -1
    rank = int((w.abs() > w[j].abs()).sum()) + 1
    return FindResult(
        unit=j % H, layer=layers[j // H], state=state, polarity=polarity, single_unit_accuracy=test_single,
        all_units_accuracy=test_all, val_single_unit_accuracy=val_single, val_all_units_accuracy=val_all, lam=lam,
        nonzero=int((w != 0).sum()), rank=rank, test_examples=len(yte),
        clamp=clamp_values(Xtr[:, j], y_train, polarity), top_units=top, sweep=sweep,
    )


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


# ---------------------------------------------------------------- records and the clamp hook


def get_record(ck: dict) -> dict:
    """The checkpoint's sentiment unit, or a CheckpointError that says how to get one."""
    rec = ck.get("sentiment")
    if not rec or "unit" not in rec:
        raise CheckpointError(
            f"{ck.get('path', 'this checkpoint')} has no sentiment unit; find one with "
            "'charrnn neuron find CHECKPOINT LABELED.tsv' or train with 'charrnn train REVIEWS.tsv --sentiment-unit'"
        )
    return rec


def set_unit(s: torch.Tensor, unit: int, col: torch.Tensor) -> torch.Tensor:
    """s (B, H) with column `unit` replaced by col (B,), written out of place so autograd sees it."""
    return torch.cat([s[:, :unit], col.view(-1, 1), s[:, unit + 1 :]], 1)


def clamp_hook(unit: int, fix: dict, layer: int):
    """A model hook (`hook(layer, t, state) -> state`, see charrnn/model.py) that fixes one unit of
    one layer at every step. `fix` maps a state part's index (0 = h, 1 = c) to its value: a number,
    or a (B,) tensor with one value per sequence. Layers below `layer` are left alone (and so may
    run on the fused kernel)."""

    def hook(l: int, t: int, state):
        if l != layer:
            return state
        parts = list(state)
        for i, v in fix.items():
            s = parts[i]
            col = v.to(s.device, s.dtype) if torch.is_tensor(v) else s.new_full((s.shape[0],), v)
            parts[i] = set_unit(s, unit, col)
        return tuple(parts)

    hook.first_layer = layer
    return hook


def hook_for(model, unit: int, value, state: str, layer: int = -1):
    """The hook that fixes `unit` of `layer` to `value` on `state`: 'h', 'c', or 'c+h' (c at value and
    h at tanh(value): the unit as if its output gate were open, as `train --sentiment-unit` fixes it)."""
    names = state_names(model)
    parts = state.split("+")
    for part in parts:
        if part not in names:
            raise UsageError(f"this {model.config.cell} model has no '{part}' state; use --state {names[0]}")
    hidden, layers = model.config.hidden, model.config.layers
    if not 0 <= unit < hidden:
        raise UsageError(f"--neuron {unit} is out of range; this model has {hidden} units per layer")
    if not -layers <= layer < layers:
        raise UsageError(f"layer {layer} is out of range; this model has {layers} layers")
    fix = {}
    for part in parts:
        squash = part == "h" and len(parts) > 1
        fix[names.index(part)] = (value.tanh() if torch.is_tensor(value) else math.tanh(value)) if squash else value
    return clamp_hook(unit, fix, layer % layers)


# ---------------------------------------------------------------- binding during training


def text_spans(data: torch.Tensor, codes: torch.Tensor, nl: int) -> torch.Tensor:
    """(3, N): start, end (exclusive, the newline) and label of every labeled text in `data`, found
    from the newlines that end them (a labeled text holds no newline) and the codes of char_labels."""
    codes = codes[: len(data)]
    ends = ((data[: len(codes)] == nl) & (codes >= 0)).nonzero().squeeze(1)
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    keep = (ends > starts) & (codes[starts.clamp(max=max(len(codes) - 1, 0))] >= 0)
    starts, ends = starts[keep], ends[keep]
    return torch.stack([starts, ends, (codes[ends] % 2).long()])


def char_labels(paths, total: int, forced_frac: float = 0.0, seed: int = 0) -> torch.Tensor:
    """One code per character of the training text, in load_corpus order: -1 outside labeled files,
    the label (0/1) in a free review, label + 2 in a review chosen (seeded, `forced_frac` of them)
    to have its unit forced."""
    from charrnn.data import is_labeled, iter_text

    parts = []
    g = torch.Generator().manual_seed(seed)
    for p in paths:
        p = Path(p)
        if is_labeled(p):
            lab = read_labeled(p)
            lens = torch.tensor([len(t) + 1 for t in lab.texts])  # each text and its newline
            codes = torch.tensor(lab.labels, dtype=torch.int8)
            codes += 2 * (torch.rand(len(codes), generator=g) < forced_frac).to(torch.int8)
            parts.append(torch.repeat_interleave(codes, lens))
        else:
            n = sum(len(piece) for piece in iter_text(p))
            parts.append(torch.full((n,), -1, dtype=torch.int8))
    labels = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int8)
    if len(labels) != total:
        raise DataError(f"the labels cover {len(labels)} characters but the corpus has {total}; "
                        "the corpus files changed while reading them")
    if not (labels >= 0).any():
        raise UsageError("--sentiment-unit needs a labeled corpus: a TSV whose first line is 'label<TAB>text'")
    return labels


class Binding:
    """Ties unit BOUND_UNIT of the top layer to the labels while the language model trains.

    The Trainer calls `before_step(step, carry)` before the forward pass, runs the model with
    `hook`, and adds `extra_loss()` to the language-model loss. Reviews are split (seeded) into:
    - forced reviews (`sentiment_clamp_frac` of them): at every character of one, the unit is fixed
      to the label's value, c = +-clamp and h = +-tanh(clamp), by a model hook on the top layer:
      exactly what `sample --sentiment` does, so the rest of the network learns to write what the
      fixed value says. Fixing h too keeps the unit visible when its output gate would close;
      Forced rows also run a second time with the opposite value, and a generative-classifier loss
      (`sentiment_contrast`) asks their text to be likelier under its own label than under the
      other: without it the network learns to ignore the unit (measured, README);
    - free reviews run with the unit left alone (never forced, so the unit cannot pass a reading
      loss by holding a forced value), under one of two reading losses (logistic, logit =
      LOGIT_SCALE * value / forced value, on c; h for GRU/RNN):
      * `sentiment_read_batch` = 0 (the default): at every character of the free reviews in the
        streamed batch. Cheap, but it settles on the prior (0) wherever the label cannot be read yet
        (SST-2: 51%, measured);
      * `sentiment_read_batch` = N > 0: a reading pass instead: each step also runs N labeled texts
        of the training split (their last `sentiment_read_chars` characters, each from the zero
        state, exactly as `neuron find` runs them) through the fused kernel, with the loss on the
        unit after the last character, where `neuron find` reads. It learns to read where the
        per-character loss does not (README), at about 20% more time per step.
    Only the top layer of the streamed batch runs step by step (the layers below stay on the fused
    kernel). The checkpoint's "sentiment" entry (updated in `trainer.extra` every step) holds the
    forced values as clamp values, and the unit's recent values where its reading loss looked
    (chunk ends of free reviews, or ends of reading texts), by label.
    """

    def __init__(self, trainer, labels: torch.Tensor):
        from charrnn.data import StreamBatcher, split

        cfg = trainer.cfg
        self.cfg, self.model, self.extra = cfg, trainer.model, trainer.extra
        train_labels, _ = split(labels, cfg.val_frac)
        self.batcher = StreamBatcher(train_labels, cfg.batch_size, cfg.seq_len)
        self.names = state_names(self.model)
        self.state = "c+h" if "c" in self.names else "h"
        # reading losses: logit = scale * value (see reading_scale). The loss is on c, the state `neuron find` reads: on h, the unit's output gate
        # closed to dodge the loss while the labels were still unreadable (measured: h of 0.001 at the
        # end of every SST-2 sentence, 50% accuracy) and the gradient died with it.
        self._scale = reading_scale(self.model, cfg.sentiment_clamp)
        self.part = self.names.index(default_state(self.model))  # the state part the reading losses look at
        self._trace: list = []
        self.top = self.model.config.layers - 1
        self._labels = None
        self._free = None
        self._read = None  # (id sequences, labels) of the current step's reading pass
        self.data = trainer.train_data
        self.nl = trainer.vocab.stoi.get("\n")
        self.spans = torch.empty(3, 0, dtype=torch.long)  # the reading pass's texts, found only when it runs
        if cfg.sentiment_read_batch > 0 and self.nl is not None:
            self.spans = text_spans(self.data, train_labels, self.nl)
        self._forced = self._values = None  # (T, B) of the current step: forced characters, their values
        self.hook = None  # the model hook for the current step, set by before_step
        old = self.extra.get("sentiment") or {}
        obs = old.get("observed") if old.get("source") == "bind" else None
        self.observed = {k: list(obs.get(k, [])) for k in ("positive", "negative")} if obs else {"positive": [], "negative": []}
        self._update_record()

    @classmethod
    def for_trainer(cls, trainer) -> "Binding":
        total = len(trainer.train_data) + len(trainer.val_data)
        cfg = trainer.cfg
        return cls(trainer, char_labels(trainer.corpus, total, cfg.sentiment_clamp_frac, cfg.seed))

    def before_step(self, step: int, carry):
        lab, _, _ = self.batcher.get(step)  # (B, T) codes of the input characters
        self._labels = lab
        forced = lab >= 2  # (B, T): characters of forced reviews
        self._free = ~forced[:, -1]
        device = carry[0].device
        self._forced = forced.t().contiguous().to(device)  # (T, B)
        self._values = (lab.t() % 2).to(device=device, dtype=carry[0].dtype).mul(2).sub(1) * self.cfg.sentiment_clamp
        self._read = self._reading_batch(step)
        self._trace = []
        self.hook = self._make_hook(self._forced, self._values, None if self._read is not None else self._trace)
        return carry

    def _reading_batch(self, step: int):
        """The step's reading texts (seeded by step, so a resumed run draws the same): id sequences
        (a newline, then the text's last sentiment_read_chars characters) and their labels."""
        n, spans = self.cfg.sentiment_read_batch, self.spans
        if n == 0 or spans.shape[1] == 0 or self.cfg.sentiment_weight == 0:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        pick = torch.randint(spans.shape[1], (n,), generator=g)
        starts, ends, labels = spans[:, pick]
        starts = torch.maximum(starts, ends - self.cfg.sentiment_read_chars)
        seqs = [[self.nl] + self.data[a:b].tolist() for a, b in zip(starts.tolist(), ends.tolist())]
        return seqs, labels.float()

    def _make_hook(self, forced: torch.Tensor, values: torch.Tensor, trace: list | None = None):
        """The model hook that fixes the unit where `forced` (T, B) holds, c to `values` (T, B) and h to
        their tanh, at each step of the top layer; the layers below run on the fused kernel. With
        `trace`, the unit's value as the cell computed it (c, or h without a cell state) is appended
        there at every step, before any fixing: what the per-character reading loss reads."""
        steps = forced.any(1).tolist()
        part = self.part

        def hook(layer: int, t: int, state):
            if layer != self.top:
                return state
            if trace is not None:
                trace.append(state[part][:, BOUND_UNIT])
            if not steps[t]:
                return state
            rows, v = forced[t], values[t]
            return tuple(
                set_unit(s, BOUND_UNIT, torch.where(rows, (v if name == "c" else torch.tanh(v)).to(s.dtype), s[:, BOUND_UNIT]))
                for s, name in zip(state, self.names)
            )

        hook.first_layer = self.top
        return hook

    def extra_loss(self, carry, x: torch.Tensor, y: torch.Tensor, carry_in, logits: torch.Tensor) -> torch.Tensor:
        """The binding's terms beside the language-model loss (see the class docstring)."""
        total = logits.new_zeros((), dtype=torch.float32)
        if self._read is not None:  # the reading pass: the loss after each text's last character
            seqs, labels = self._read
            v = unit_at_ends(self.model, seqs, logits.device)
            self._observe(v.detach().cpu(), labels)
            total = total + self.cfg.sentiment_weight * F.binary_cross_entropy_with_logits(
                self._scale * v, labels.to(v.device))
        else:  # the loss at every character of the free reviews in the streamed batch
            self._observe(carry[self.part][-1, :, BOUND_UNIT].detach().float().cpu()[self._free],
                          self._labels[:, -1][self._free])
            lab = self._labels.to(logits.device)
            known = (lab == 0) | (lab == 1)  # characters of free reviews
            if known.any():
                v = torch.stack(self._trace, 1).float()  # (B, T): c (h without a cell state) as computed
                total = total + self.cfg.sentiment_weight * F.binary_cross_entropy_with_logits(
                    self._scale * v[known], lab[known].float())
        if self.cfg.sentiment_contrast > 0:
            total = total + self.cfg.sentiment_contrast * self._contrast(x, y, carry_in, logits)
        return total

    def _contrast(self, x, y, carry_in, logits) -> torch.Tensor:
        """Generative-classifier loss on forced reviews: -log sigmoid(mean_t log p(x_t | label) - log p(x_t | opposite)).

        The rows inside a forced review run a second time with the unit fixed to the opposite value;
        the loss asks the text to be more likely under its own label than under the other, so the
        rest of the network must make the unit's value change what it writes."""
        forced = self._forced.t()  # (B, T)
        rows = forced.any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return logits.new_zeros((), dtype=torch.float32)
        opposite = self._make_hook(self._forced[:, rows], -self._values[:, rows])
        other, _, _ = self.model(x[rows], None, tuple(s[:, rows] for s in carry_in), hook=opposite)
        mask = forced[rows].float()
        vocab = logits.shape[-1]
        own = -F.cross_entropy(logits[rows].float().reshape(-1, vocab), y[rows].reshape(-1), reduction="none")
        opp = -F.cross_entropy(other.float().reshape(-1, vocab), y[rows].reshape(-1), reduction="none")
        # the mean log-likelihood ratio per forced character: a sum over the chunk made this term's
        # gradient dwarf the language model's under the global norm clip (measured: val loss 2.28
        # instead of 1.84 after 330 steps)
        d = ((own - opp).view(len(rows), -1) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.softplus(-d).mean()

    def _observe(self, v: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the unit's values `v` (c, or h without a cell state) where its reading loss looked, by label."""
        for name, y in (("positive", 1), ("negative", 0)):
            sel = v[labels == y]
            if sel.numel():
                buf = self.observed[name]
                buf.extend(sel.tolist())
                del buf[: max(0, len(buf) - OBSERVED_KEEP)]
        self._update_record()

    def _update_record(self) -> None:
        # The clamp values of a bound unit are the values training forced (what the network learned
        # to read); the observed 10th/90th percentiles of the free unit are kept beside them.
        pos, neg = self.observed["positive"], self.observed["negative"]
        c = self.cfg.sentiment_clamp
        v = c if "c" in self.names else math.tanh(c)
        observed = None
        if len(pos) >= 8 and len(neg) >= 8:
            vals = torch.tensor(pos + neg)
            observed = clamp_values(vals, torch.tensor([1] * len(pos) + [0] * len(neg)), 1)
        self.extra["sentiment"] = {
            "unit": BOUND_UNIT, "layer": self.top, "state": self.state, "polarity": 1,
            "clamp": {"positive": v, "negative": -v}, "observed_clamp": observed, "source": "bind",
            "train_clamp": c, "observed": {"positive": list(pos), "negative": list(neg)},
        }


# ---------------------------------------------------------------- steering and showing


def steering_hook(model, ck: dict, sentiment: str | None = None, neuron: int | None = None,
                  value: float | None = None, state: str | None = None, guided_rows: int = 0):
    """The hook for `sample`: (hook or None, a one-line description of what is fixed).

    With guided_rows = n > 0 (sample --guidance) the hook covers 2n rows: the first n fixed as asked,
    the last n fixed the opposite way (the other sentiment's value, or -V for --neuron K --value V)."""
    if sentiment is None and neuron is None and value is None:
        if state is not None:
            raise UsageError("--state chooses the state of --sentiment or --neuron; give one of them too")
        if guided_rows:
            raise UsageError("--guidance contrasts two fixed values of a unit; give --sentiment or --neuron K --value V too")
        return None, ""
    if sentiment is not None and neuron is not None:
        raise UsageError("give --sentiment or --neuron K --value V, not both")
    if sentiment is None and (neuron is None or value is None):
        raise UsageError("--neuron K needs --value V, and --value needs --neuron K or --sentiment")
    if sentiment is not None:
        if sentiment not in ("positive", "negative"):
            raise UsageError(f"--sentiment must be positive or negative (got {sentiment!r})")
        rec = get_record(ck)
        if state is not None and state != rec["state"]:
            raise UsageError(f"the sentiment unit was found on the '{rec['state']}' state; leave out --state "
                             f"or fix a unit by hand with --neuron K --value V --state {state}")
        unit, layer, state = rec["unit"], rec["layer"], rec["state"]
        other = rec["clamp"]["negative" if sentiment == "positive" else "positive"]
        if value is not None:  # a hand-given value; the opposite one mirrors it across the midpoint
            other = rec["clamp"]["positive"] + rec["clamp"]["negative"] - value
        value = rec["clamp"][sentiment] if value is None else value
    else:
        unit, layer, state = neuron, model.config.layers - 1, state or default_state(model)
        other = -value
    said = f"fixing unit {unit} of layer {layer} ({state}) at {value:.3f}"
    if guided_rows:
        values = torch.tensor([float(value)] * guided_rows + [float(other)] * guided_rows)
        return hook_for(model, unit, values, state, layer), said + f", contrasted with {other:.3f}"
    return hook_for(model, unit, value, state, layer), said


def unit_colors(values: list[float], lo: float, hi: float) -> list[tuple[int, int, int]]:
    """Red (at lo and below) through pale grey to green (at hi and above), one RGB per value."""
    red, mid, green = (215, 48, 39), (235, 235, 235), (26, 152, 80)
    out = []
    span = (hi - lo) or 1.0
    for v in values:
        t = min(1.0, max(0.0, (v - lo) / span))
        a, b, f = (red, mid, t * 2) if t < 0.5 else (mid, green, t * 2 - 1)
        out.append(tuple(int(round(x + (y - x) * f)) for x, y in zip(a, b)))
    return out


def color_range(values: list[float], rec: dict | None) -> tuple[float, float]:
    """The values mapped to full red and full green: the record's clamp values, else the trace's range."""
    if rec is not None:
        return rec["clamp"]["negative"], rec["clamp"]["positive"]
    lo, hi = min(values), max(values)
    m = max(abs(lo), abs(hi)) or 1.0
    return -m, m


def render_html(text: str, values: list[float], colors, title: str) -> str:
    """A standalone page: each character on its colour, its value in a tooltip."""
    import html

    spans = []
    for ch, v, (r, g, b) in zip(text, values, colors):
        shown = "<br>" if ch == "\n" else html.escape(ch)
        spans.append(f'<span style="background:rgb({r},{g},{b})" title="{v:.3f}">{shown}</span>')
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>\n"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{font-family:monospace;white-space:pre-wrap;line-height:1.6;font-size:15px}</style></head>\n"
        "<body><h3>" + html.escape(title) + "</h3>\n<p>red: negative, green: positive "
        "(hover a character for the unit's value)</p>\n<pre>" + "".join(spans) + "</pre></body></html>\n"
    )
