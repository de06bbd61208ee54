"""Training configuration and its defaults, including the sizes chosen from the corpus and the time budget.

All defaults live here. A field left as None is "auto": `resolve` fills it from the corpus size
and the length of the run (see the README's "How the defaults were chosen").
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

from charrnn.errors import CharRNNError, UsageError

DEFAULT_TIME_S = 15 * 60.0  # length of a run given no --steps/--epochs/--time
# Peak learning rate of a 256-unit model, smaller for wider ones by sqrt(256 / hidden) (the usual
# Adam rule of thumb for width). On tiny Shakespeare, 5 minutes, 2x256: 5e-3 reached 1.5022 nats/char
# and 3e-3 1.5053 (README: "How the defaults were chosen").
BASE_LR = 5e-3
# AdamW's decoupled weight decay (each step shrinks every weight by lr * WEIGHT_DECAY). On tiny Shakespeare,
# 2x256 at equal steps (6,500), 0.3 reached 1.4069 / 1.4147 nats/char and 0.1 1.4129 / 1.4145, against plain
# Adam's 1.4344 / 1.4523; the 30-minute default (2x512) reached 1.3680 with 0.3, 1.4062 with 0.1 and at best
# 1.4229 without (docs/training.md: "Weight decay"). A --sentiment-unit run keeps 0: its recipe was measured
# without it.
WEIGHT_DECAY = 0.3
DEFAULT_PATIENCE = 5  # evaluations without a new best before a time-budget run stops early
DEFAULT_MAX_EPOCHS = 50  # cap on a run given no length at all
EVALS_PER_RUN = 10  # evaluations (and saves) in a run given no --eval-every
SEED_LIMIT = 2**64  # seeds are 0 .. 2**64 - 1: what torch's generators hold (larger ones overflow there)
# Upper bounds for sizes no run could use: past them torch overflows (a traceback, not an out-of-memory
# line) or, for threads and layers, builds absurd thread pools or module lists before failing.
MAX_SIZE = 1 << 20  # hidden, embed, seq_len, batch_size
MAX_LAYERS = 1024
MAX_THREADS = 1024
PRECISIONS = ("auto", "fp32", "bf16")  # train --precision


# TrainConfig's flat fields before SentimentConfig held them (checkpoints of older runs): old name -> field
OLD_SENTIMENT_FIELDS = {"sentiment_unit": "unit", "sentiment_contrast": "contrast", "sentiment_clamp_frac": "fixed",
                        "sentiment_read_batch": "read", "sentiment_read_chars": "read_chars",
                        "sentiment_weight": "weight", "sentiment_clamp": "value"}


@dataclass(frozen=True)
class SentimentConfig:
    """Binding a unit to labels while the language model trains (charrnn/neuron/bind.py). The fields
    are the flags' names: --sentiment-unit, --sentiment-contrast, --sentiment-fixed, --sentiment-read."""

    unit: bool = False  # bind unit 0 of the top layer to the labels of a labeled TSV corpus
    contrast: float = 2.0  # weight of the generative-classifier loss on fixed reviews; 0: off (5 unsettled long runs: research log)
    contrast_from: float = 0.1  # the contrast is off for this share of the run's steps, at full weight from twice it
    contrast_rows: int | None = None  # the contrast's second pass runs this many streams of the batch (the first
    # ones in a fixed review); None: all of them (fewer were noisier and cost the language model more: research log)
    fixed: float = 0.75  # share of reviews whose unit is fixed to the label at every character
    read: int = 0  # 0: the reading loss is at every character of free reviews; N: a reading pass
    # of N labeled texts per step, with the loss after each one's last character
    read_chars: int = 128  # the reading pass runs the last this-many characters of each text
    weight: float = 1.0  # weight of the unit's reading loss (logistic) beside the language-model loss
    value: float = 2.0  # the cell-state value a unit is fixed at (+ positive, - negative; h gets tanh of it)

    @classmethod
    def from_dict(cls, d: dict) -> "SentimentConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    """What the user asked for, with the auto fields filled once by `resolve`; never changed after it."""

    # model (None: chosen by `resolve`)
    cell: str = "lstm"  # recurrent cell
    layers: int | None = None  # stacked recurrent layers
    hidden: int | None = None  # units per layer
    embed: int = 0  # embedding width; 0: same as hidden
    dropout: float | None = None  # dropout between layers and before the head
    # optimisation
    seq_len: int | None = None  # characters per truncated-BPTT window; None: SEQ_BY_DEVICE
    batch_size: int | None = None  # parallel contiguous streams of the corpus; None: 32 on a CPU, 128 on a GPU
    lr: float | None = None  # peak Adam learning rate; None: BASE_LR scaled by sqrt(256 / hidden)
    min_lr_frac: float = 0.0  # the cosine schedule ends at lr * min_lr_frac (docs/training.md: to zero
    # beat 5% in three seeds out of three)
    warmup_steps: int = 50  # linear warm-up from 0
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables it
    weight_decay: float | None = None  # AdamW's decoupled decay; None: WEIGHT_DECAY, 0 for a --sentiment-unit run
    seed: int = 1337  # seeds weights, dropout and sampling of the run
    # length (at most one; none: DEFAULT_TIME_S)
    steps: int | None = None
    epochs: float | None = None
    time_s: float | None = None
    # validation and checkpoints
    val_frac: float = 0.1  # the LAST fraction of the corpus is held out
    eval_every: int | None = None  # steps between evaluations and saves; None: about EVALS_PER_RUN per run
    # (the run chooses it, and keeps it in its RunState: for a time budget it follows the measured speed)
    eval_chars: int = 250_000  # characters of validation text scored at each evaluation
    keep: int = 1  # newest checkpoints kept besides the best
    eval_sample_len: int = 200  # characters of the seeded sample drawn at each evaluation (samples.jsonl); 0: none
    eval_sample_temp: float = 0.8  # its temperature
    patience: int | None = None  # stop after this many evaluations without a new best; 0: never;
    # None: 5 for a time-budget run (the budget is a limit, not a goal), never for --steps/--epochs
    # hardware
    device: str = "auto"
    precision: str = "auto"  # one of PRECISIONS: the forward pass in fp32, or bf16 autocast; auto: bf16 where
    # measured faster on a CPU with native bf16, CUDA's mixed precision on a GPU (charrnn/precision.py)
    threads: int | None = None  # CPU threads; None: PyTorch's default
    encoding_errors: str = "strict"  # 'strict' or 'replace' for invalid UTF-8 in the corpus
    sentiment: SentimentConfig = field(default_factory=SentimentConfig)  # train --sentiment-unit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of `to_dict`, or of a checkpoint written when the sentiment options were flat fields."""
        names = {f.name for f in fields(cls)}
        flat = {new: d[old] for old, new in OLD_SENTIMENT_FIELDS.items() if old in d}
        sentiment = SentimentConfig.from_dict({**flat, **(d.get("sentiment") or {})})
        if "weight_decay" not in d:  # a run from before weight decay: it trained, and resumes, with plain Adam
            d = {**d, "weight_decay": 0.0}
        return cls(**{k: v for k, v in d.items() if k in names and k != "sentiment"}, sentiment=sentiment)


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h', '1h30m' or a bare number of seconds -> seconds."""
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|s)", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise UsageError(f"cannot read the duration {text!r}; write it like 90s, 5m or 1h30m")
    secs = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if secs <= 0:
        raise UsageError(f"the duration {text!r} must be longer than zero")
    if not math.isfinite(secs):
        raise UsageError(f"the duration {text[:40]!r} is too long to count; write it like 90s, 5m or 1h30m")
    return secs


def check_seed(seed: int | None, option: str = "--seed") -> None:
    """Reject a seed torch's generators cannot hold (negative seeds too: there they alias large ones)."""
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"{option} must be a whole number from 0 to {SEED_LIMIT - 1} (got {seed})")


def check_finite(**values: float | None) -> None:
    """Reject NaN and infinity, which pass every range check written as a comparison (nan < 0 is False)."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number (got {v})")


def validate(cfg: TrainConfig) -> None:
    """Reject values that no run could use, before anything is read or written."""
    from charrnn.model import CELLS

    if cfg.cell not in CELLS:
        raise UsageError(f"unknown cell {cfg.cell!r}; choose one of {', '.join(CELLS)}")
    check_finite(dropout=cfg.dropout, lr=cfg.lr, grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay,
                 epochs=cfg.epochs, time=cfg.time_s, val_frac=cfg.val_frac, min_lr_frac=cfg.min_lr_frac,
                 sentiment_weight=cfg.sentiment.weight,
                 sentiment_fixed=cfg.sentiment.fixed, sentiment_contrast=cfg.sentiment.contrast,
                 sentiment_value=cfg.sentiment.value, eval_sample_temp=cfg.eval_sample_temp)
    check_seed(cfg.seed)
    for name in ("layers", "hidden", "seq_len", "batch_size", "steps", "eval_every", "eval_chars", "threads"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")
    limits = {"hidden": MAX_SIZE, "embed": MAX_SIZE, "seq_len": MAX_SIZE, "batch_size": MAX_SIZE,
              "layers": MAX_LAYERS, "threads": MAX_THREADS}
    for name, limit in limits.items():
        v = getattr(cfg, name)
        if v is not None and v > limit:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {limit:,} (got {v:,})")
    if cfg.embed < 0:
        raise UsageError(f"--embed must be 0 (same as --hidden) or more (got {cfg.embed})")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1) (got {cfg.dropout})")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UsageError(f"--lr must be above 0 (got {cfg.lr})")
    if cfg.grad_clip < 0:
        raise UsageError(f"--grad-clip must be 0 (off) or more (got {cfg.grad_clip})")
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        raise UsageError(f"--weight-decay must be 0 (off) or more (got {cfg.weight_decay})")
    if not 0.0 < cfg.val_frac < 1.0:
        raise UsageError(f"--val-frac must be between 0 and 1 (got {cfg.val_frac})")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise UsageError(f"--epochs must be above 0 (got {cfg.epochs})")
    if sum(x is not None for x in (cfg.steps, cfg.epochs, cfg.time_s)) > 1:
        raise UsageError("give at most one of --steps, --epochs and --time")
    if cfg.patience is not None and cfg.patience < 0:
        raise UsageError(f"--patience must be 0 (never stop early) or more (got {cfg.patience})")
    if not 0 <= cfg.eval_sample_len <= MAX_SIZE:
        raise UsageError(f"--eval-sample-len must be from 0 (off) to {MAX_SIZE:,} (got {cfg.eval_sample_len})")
    if cfg.eval_sample_temp < 0:
        raise UsageError(f"eval_sample_temp must be 0 (greedy) or more (got {cfg.eval_sample_temp})")
    if cfg.keep < 1:
        raise UsageError(f"--keep must be at least 1 (got {cfg.keep})")
    sc = cfg.sentiment
    if sc.read < 0 or sc.read_chars < 1:
        raise UsageError("sentiment reading needs a batch >= 0 and at least 1 character per text")
    rows_ok = sc.contrast_rows is None or sc.contrast_rows >= 1
    if sc.weight < 0 or sc.contrast < 0 or not 0.0 <= sc.fixed <= 1.0 or sc.value <= 0 or not rows_ok \
            or not 0.0 <= sc.contrast_from <= 0.5:
        raise UsageError("sentiment binding needs weight >= 0, fixed fraction in [0, 1], fixed value > 0 "
                         "at least 1 contrast row and the contrast starting within the first half")
    if cfg.encoding_errors not in ("strict", "replace"):
        raise UsageError("--encoding-errors must be 'strict' or 'replace'")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.precision!r})")


# Widths a run with a time budget chooses among on a CPU (charrnn/sizing.py times them on the machine itself);
# $CHARRNN_WIDTHS (comma-separated) replaces them, e.g. tiny ones in tests.
# 320 since issue 20: between 256 and 384 the 5-minute run on a fast CPU had no width that the rule allowed
# and that read near its 5 characters per parameter (2x256 read 13, 2x384 about 3; docs/training.md).
WIDTHS = (128, 192, 256, 320, 384, 512, 768)
WIDTHS_ENV = "CHARRNN_WIDTHS"
# The rule: the widest width that reads at least this many training characters per parameter in the budget.
# Fitted on the runs behind the old table (docs/training.md, "How the defaults were chosen"): on the 2-core
# reference CPU (2x256 21,000 chars/s, 2x384 10,500, 2x512 6,000) its crossovers, 384 from 15 minutes and
# 512 from an hour, fell at 3.9 and 5.1 characters per parameter; 5 keeps the hour and moves the first to 19 min.
CHARS_PER_PARAM = 5.0
# ... when the width reads its training text at least once in the budget. A budget that reads less than one
# pass sees only fresh text, where a wider model pays sooner. Fitted on the review corpus of issue 19 (11.2M
# chars, 15 minutes, one thread; characters each run read per parameter, docs/training.md): the LSTM's 2x384
# lost to its 2x256 plain (read 0.95 against 5.1; 1.6037 against 1.5442) and bound (0.68 against 4.6;
# 1.5677 against 1.4952); the GRU's 2x384 won plain at 1.54 (1.4677 against 1.4874 at 7.2) and lost bound at
# 0.83. So the crossover lies between 1 and 4 for the LSTM, lower for the GRU.
FRESH_CHARS_PER_PARAM = 2.0
# On a CUDA GPU a step of a wider model costs little more than a narrow one (the recurrence is
# latency-bound), so the GPU gets more streams and more width for the same budget (README: "On a GPU").
GPU_SIZE_BY_BUDGET = [(900, 512), (float("inf"), 1024)]
BATCH_BY_DEVICE = {"cpu": 32, "cuda": 128, "mps": 64}
# Shorter windows give more updates for the same characters; the state still flows across windows.
# tiny Shakespeare, 5 minutes on the 2-core CPU (2x256, batch 32): seq 128 -> 1.5036, 64 -> 1.4738
# nats/char (README: "How the defaults were chosen"). The GPU figures were measured at 128.
SEQ_BY_DEVICE = {"cpu": 64, "cuda": 128, "mps": 128}


def time_budget(cfg: TrainConfig) -> float | None:
    """The run's wall-clock budget: --time, or DEFAULT_TIME_S given no length at all; None for --steps/--epochs."""
    if cfg.steps is not None or cfg.epochs is not None:
        return None
    return cfg.time_s if cfg.time_s is not None else DEFAULT_TIME_S


def weight_decay_for(cfg: TrainConfig) -> float:
    """The run's AdamW decay: the one given, else WEIGHT_DECAY, or 0 for a --sentiment-unit run (its recipe was
    measured without decay)."""
    if cfg.weight_decay is not None:
        return cfg.weight_decay
    return 0.0 if cfg.sentiment.unit else WEIGHT_DECAY


def resolve(cfg: TrainConfig, train_chars: int, budget_s: float | None, device_type: str = "cpu",
            arch: dict | None = None, measure: "Measure | None" = None) -> TrainConfig:
    """Fill the auto fields from the corpus size, the time budget (when the run has one) and the device.

    `arch` is the model_config of an --init-from checkpoint: its cell and sizes replace the asked-for
    ones first, so the learning rate (and anything else sized by the width) is chosen for the width
    that will actually train; its dropout too, unless one was given.

    A CPU run's width is the rule's (`width_for`) on the candidates that fit the corpus. `measure(cfg,
    widths)` gives their speeds on this machine (charrnn/sizing.py); it is asked only for a run with a
    time budget that has a choice to make, and otherwise (or when it measured nothing) the reference
    CPU's speeds stand in. The chosen width's measured speed also sizes the dropout.
    """
    if arch is not None:
        cfg = replace(cfg, **{k: arch[k] for k in ("cell", "layers", "hidden", "embed")},
                      dropout=arch["dropout"] if cfg.dropout is None else cfg.dropout)
    out = replace(
        cfg,
        batch_size=cfg.batch_size or BATCH_BY_DEVICE.get(device_type, 32),
        seq_len=cfg.seq_len or SEQ_BY_DEVICE.get(device_type, 64),
        layers=cfg.layers or 2,
        patience=cfg.patience if cfg.patience is not None else
        DEFAULT_PATIENCE if cfg.steps is None and cfg.epochs is None else 0,
    )
    measured: dict[int, Speed] = {}
    if out.hidden is None and device_type == "cuda":
        out = replace(out, hidden=_gpu_hidden(out.layers, train_chars, budget_s))
    elif out.hidden is None:
        widths = candidate_widths(out.layers, train_chars)
        if measure is not None and budget_s is not None and len(widths) > 1:
            measured = measure(out, widths)
        speeds = measured or reference_speeds(out, widths)
        out = replace(out, hidden=width_for(speeds, budget_s if budget_s is not None else DEFAULT_TIME_S, train_chars))
    if out.lr is None:
        out = replace(out, lr=round(min(BASE_LR, BASE_LR * math.sqrt(256 / out.hidden)), 6))
    out = replace(out, weight_decay=weight_decay_for(out))
    if out.dropout is None:
        speed = measured.get(out.hidden)
        epochs = expected_epochs(out, train_chars, budget_s, device_type, speed.chars_per_s if speed else None)
        params = param_count(out.cell, out.layers, out.hidden, out.embed)
        out = replace(out, dropout=dropout_for(epochs, params, train_chars))
    return out


def _gpu_hidden(layers: int, train_chars: int, budget_s: float | None) -> int:
    """The GPU's width: from its table by the budget, capped for a small corpus."""
    budget = budget_s if budget_s is not None else DEFAULT_TIME_S
    hidden = next(h for limit, h in GPU_SIZE_BY_BUDGET if budget <= limit)
    while hidden > 128 and not fits_corpus(hidden, layers, train_chars):
        hidden //= 2
    return hidden


def fits_corpus(hidden: int, layers: int, train_chars: int) -> bool:
    """A small corpus does not need (and overfits) a wide model: at most about 8 weights per character
    (8 h^2 per layer); 128 units always fit."""
    return hidden <= 128 or hidden * hidden * 8 * layers <= 8 * train_chars


def candidate_widths(layers: int, train_chars: int) -> list[int]:
    """The widths a CPU run may choose among for this corpus, narrowest first ($CHARRNN_WIDTHS or WIDTHS)."""
    text = os.environ.get(WIDTHS_ENV, "").strip()
    widths = WIDTHS
    if text:
        try:
            widths = tuple(int(w) for w in text.split(","))
        except ValueError:
            widths = ()
        if not widths or not all(1 <= w <= MAX_SIZE for w in widths):
            raise CharRNNError(f"${WIDTHS_ENV} must be widths separated by commas, like 128,256,512 (got {text[:40]!r})")
    return sorted({w for w in widths if fits_corpus(w, layers, train_chars)}) or [min(widths)]


Measure = Callable[["TrainConfig", list[int]], "dict[int, Speed]"]  # (partly resolved config, widths) -> speeds


@dataclass(frozen=True)
class Speed:
    """A width's training speed: what the rule weighs."""

    chars_per_s: float
    params: int


def chars_per_param(speed: Speed, budget_s: float) -> float:
    return budget_s * speed.chars_per_s / max(speed.params, 1)


def rule_for(speed: Speed, budget_s: float, train_chars: int | None) -> float:
    """The characters per parameter a width must read in the budget: CHARS_PER_PARAM, or FRESH_CHARS_PER_PARAM
    where it reads less than its training text once (a corpus this budget cannot repeat)."""
    if train_chars is not None and budget_s * speed.chars_per_s < train_chars:
        return FRESH_CHARS_PER_PARAM
    return CHARS_PER_PARAM


def width_for(speeds: dict[int, Speed], budget_s: float, train_chars: int | None = None) -> int:
    """The rule: the widest width that reads at least `rule_for` training characters per parameter in the
    budget; the narrowest when none does."""
    fit = [h for h, s in speeds.items() if chars_per_param(s, budget_s) >= rule_for(s, budget_s, train_chars)]
    return max(fit) if fit else min(speeds)


def reference_speeds(cfg: "TrainConfig", widths: list[int]) -> dict[int, Speed]:
    """The speeds of the 2-core reference CPU (REFERENCE_CHAR_PARAMS_PER_S), for a run that measures none."""
    out = {}
    for h in widths:
        params = param_count(cfg.cell, cfg.layers, h, cfg.embed)
        out[h] = Speed(REFERENCE_CHAR_PARAMS_PER_S / params, params)
    return out


# chars/s x parameters of training, measured on the 2-core reference CPU for LSTMs of 2x256 to
# 2x512 (about 21,000, 10,500 and 6,000 chars/s): a rough speed model, used only to guess how
# many passes over the corpus a time budget allows.
REFERENCE_CHAR_PARAMS_PER_S = 2.4e10
# On a GPU the recurrence is bound by kernel latency, not arithmetic: an H100 trained 2x512 and
# 2x1024 LSTMs at batch 128 at about the same 1.1M chars/s (README: "On a GPU").
GPU_CHARS_PER_S = 1.0e6
# (exposure up to, dropout), where a run's exposure is the passes over its training text it is expected to make
# times sqrt(weights / training characters): a model with more weights per character of its text learns the
# text's exact windows after fewer passes. Fitted on tiny Shakespeare runs (docs/training.md, "Dropout from the
# passes and the model's size"; the factor is 0.77 for 2x192, 1.02 for 2x256, 1.54 for 2x384, 2.05 for 2x512):
# - none against 0.1, 2x192: none won at 4.1 and 6.2 passes (exposure 3.2, 4.8) and in two default runs at
#   5.8 and 6.3 passes (4.5, 4.9); 0.1 won at 8.3 (6.4). The first step is at 5.5.
# - 0.1 against 0.2, 2x256: 0.1 won at 13.3 passes (13.6) in both seeds by 0.012-0.019 at equal steps; level at
#   15 passes (15.4; a 5% floor on the schedule then). The passes are predicted from the sizing's fastest timed
#   step, which runs ahead of training on a shared VM (the 5-minute default timed 2x256 at 62,000-85,000 chars/s
#   and trained at 47,000-53,000: 19-26 predicted for 13-16 read), so the step is at 30, past every such timing
#   (up to 98,000 chars/s): between 15.4 and 30 it is not measured.
# - 0.2 against 0.3: 2x512 at 23.5-24.9 passes read, 27-35 predicted (56-71): 0.3 reached 1.4259 and 1.4302,
#   0.2 1.4289 and 1.4471 (then overfitted); 2x384 at 40-42 passes (62-65): 0.2 1.4416 (then up to 1.4504), 0.3
#   1.4459 still falling; an H100's 2x512 at 90 passes (184): 0.3 1.4278 against 0.5's 1.4388. The step is at
#   40, so every 2x512 the 30-minute budget buys on tiny Shakespeare (at least 5 characters per weight: 21+
#   passes, 43+) gets 0.3, where under passes alone a timing of 15,280 chars/s got 0.2.
DROPOUT_BY_EXPOSURE = [(5.5, 0.0), (30, 0.1), (40, 0.2), (float("inf"), 0.3)]


def dropout_for(passes: float, params: int, train_chars: int) -> float:
    """The dropout for a run expected to read its training text `passes` times with `params` weights."""
    exposure = passes * math.sqrt(params / max(train_chars, 1))
    return next(d for limit, d in DROPOUT_BY_EXPOSURE if exposure <= limit)


GATES = {"lstm": 4, "peephole": 4, "coupled": 3, "mlstm": 4, "gru": 3, "rnn": 1}


def param_count(cell: str, layers: int, hidden: int, embed: int = 0) -> int:
    """About how many weights the recurrent layers of this shape have (the embedding and head left out)."""
    g, e = GATES.get(cell, 4), embed or hidden
    return g * hidden * (e + hidden + 2) + (layers - 1) * g * hidden * (2 * hidden + 2)


def expected_epochs(cfg: TrainConfig, train_chars: int, budget_s: float | None, device_type: str = "cpu",
                    chars_per_s: float | None = None) -> float:
    """About how many passes over the training text the run will make (at `chars_per_s` when measured)."""
    if cfg.steps is not None:
        return cfg.steps * cfg.batch_size * cfg.seq_len / max(train_chars, 1)
    if cfg.epochs is not None:
        return cfg.epochs
    budget = budget_s if budget_s is not None else DEFAULT_TIME_S
    if chars_per_s is None:
        params = param_count(cfg.cell, cfg.layers, cfg.hidden, cfg.embed)
        chars_per_s = GPU_CHARS_PER_S if device_type == "cuda" else REFERENCE_CHAR_PARAMS_PER_S / max(params, 1)
    return budget * chars_per_s / max(train_chars, 1)
