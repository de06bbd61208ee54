"""Sampling text from a model: temperature, top-k and top-p filters, and a seeded generator."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from charrnn.config import check_finite, check_seed
from charrnn.data import Vocab
from charrnn.device import cpu_has_bf16  # noqa: F401 (one detection for training and sampling; re-exported)
from charrnn.errors import CheckpointError, UsageError
from charrnn.lexicon import Lexicon, Speller
from charrnn.model import CharRNN, weights_key
from charrnn.stops import StopStrings, check_stops


# `sample --sentiment`'s guidance unless --guidance is given (0 = plain fixing). On the README recipe's
# model (400 samples per side, temperature 0.8) plain fixing separated positive from negative samples by
# +37 (VADER) / +26 (AFINN) points, real reviews by +28 / +32; 0.25 by +48 / +35 (seed 2: +50 / +41), at
# 0.08 nats/char more under the unit-free model; 0.5 by +59 / +53 and less fluent.
SENTIMENT_GUIDANCE = 0.25
# The same for a unit bound by today's `train --sentiment-unit` (a model with ModelConfig.bound_unit):
# on the issue-19 recipe's model (200-400 samples per side, temperature 0.8) 0 separated by +15 / +5,
# 0.25 by +27 / +18, 0.5 by +29 / +26 and 1 by +51 / +48 points, real reviews by +36 / +37, with
# 0.74-0.79 real words at 1 against 0.79-0.80 at 0.25 (0.75 for the unit-free samples) and no soup.
BOUND_GUIDANCE = 1.0


def default_guidance(model, ck: dict, sentiment: str | None) -> float:
    """The guidance when --guidance is not given, for this model (a CharRNN) and its checkpoint: 0 without
    --sentiment; with it BOUND_GUIDANCE when the checkpoint's sentiment unit is the unit the model holds
    (bound by training), SENTIMENT_GUIDANCE for a unit `neuron find` found (also one found in a bound model)."""
    if sentiment is None:
        return 0.0
    rec = ck.get("sentiment") or {}
    bound = model.config.bound_unit
    is_bound = bound is not None and rec.get("source") == "bind" and rec.get("unit") == bound
    return BOUND_GUIDANCE if is_bound else SENTIMENT_GUIDANCE
# --guidance contrasts the two streams only over the characters the own stream gives at least this
# fraction of its likeliest character's probability (see guided_logits).
GUIDANCE_PLAUSIBLE = 0.05
# --guidance above this is out of range: 0.5 already reads less fluent (README), and far above it
# own + G * (own - opposite) overflows float32 (G around 1e36) and the draw has no distribution left.
MAX_GUIDANCE = 100.0
WORDS = ("known", "any")  # SampleConfig.words
# Below this temperature pick() checks whether logits / T overflowed float32 (T = 1e-39 does).
TINY_TEMPERATURE = 1e-3


@dataclass
class SampleConfig:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely characters; 0: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: all
    length: int = 500  # characters to generate after the prime
    prime: str = ""  # text to start from; empty: a newline (or the first character of the vocabulary)
    seed: int | None = None  # same seed, same text; None: random
    num: int = 1  # independent samples, generated together as one batch
    precision: str = "auto"  # weights and states: fp32, bf16, or auto (see choose_precision)
    guidance: float = 0.0  # > 0: contrast with a shadow stream fixed the opposite way (see generate)
    stop: tuple[str, ...] = ()  # each sample ends at its first match of one of these (charrnn/stops.py)
    stop_keep: bool = False  # the match ends the sample's text; False: it is cut off
    words: str = "known"  # known: spell only the words of the model's corpus (its lexicon, charrnn/lexicon.py); any: free


def validate(cfg: SampleConfig) -> None:
    check_finite(temp=cfg.temperature, top_p=cfg.top_p, guidance=cfg.guidance)
    check_seed(cfg.seed)
    if cfg.temperature < 0:
        raise UsageError(f"--temp must be 0 (greedy) or more (got {cfg.temperature})")
    if cfg.top_k < 0:
        raise UsageError(f"--top-k must be 0 (off) or more (got {cfg.top_k})")
    if not 0.0 < cfg.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1] (got {cfg.top_p})")
    if cfg.length < 0:
        raise UsageError(f"--length must be 0 or more (got {cfg.length})")
    if cfg.num < 1:
        raise UsageError(f"--num must be at least 1 (got {cfg.num})")
    if cfg.words not in WORDS:
        raise UsageError(f"--words must be one of {', '.join(WORDS)} (got {cfg.words!r})")
    if not 0 <= cfg.guidance <= MAX_GUIDANCE:
        raise UsageError(f"--guidance must be from 0 (off) to {MAX_GUIDANCE:g} (got {cfg.guidance})")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.precision!r})")
    check_stops(cfg.stop)


# ---------------------------------------------------------------- precision

PRECISIONS = ("auto", "fp32", "bf16")


def choose_precision(model: CharRNN, requested: str, num: int) -> str:
    """'fp32' or 'bf16' for sampling `num` streams from `model` where it lives; auto measures both on a
    CPU with native bf16, once per machine and shape (charrnn/sampleprecision.py), and is fp32 elsewhere."""
    if requested != "auto":
        return requested
    from charrnn.sampleprecision import auto_precision

    return auto_precision(model, num)


def with_precision(model: CharRNN, precision: str) -> CharRNN:
    """The model itself for fp32; a bf16 copy for bf16 (the caller's model is left as it was).

    The copy is kept on the model and handed out again while no weight of the model has changed (their
    version counters): a server or a notebook sampling one model again and again converts it once. A
    2x512 LSTM's copy took 3-10 ms to make, and the first step after it 3-9 ms more (layer 0's table);
    a 75-character sample of one stream takes about 20 ms."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if model.head.weight.dtype == dtype:
        return model
    key = (dtype,) + weights_key(model.parameters())
    kept = model.__dict__.get("_precision_copy")
    if kept is None or kept[0] != key:
        kept = (key, copy.deepcopy(model).to(dtype))  # the copy starts without the model's own caches
        model.__dict__["_precision_copy"] = kept
    return kept[1]


# ---------------------------------------------------------------- filters (logits -> logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T. A T so close to 0 that this overflows float32 (1e-39) is taken as its limit T -> 0:
    every character but the most likely one (or the tied most likely ones) gets probability 0."""
    scaled = logits / temperature
    if temperature >= TINY_TEMPERATURE or torch.isfinite(scaled).all():
        return scaled
    top = logits.max(dim=-1, keepdim=True).values
    return torch.zeros_like(logits).masked_fill(logits < top, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit outside the k largest of its row to -inf (k = 0 or k >= V: no change)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely characters whose probabilities first reach p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely characters
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """Next character ids (B,) from logits (B, V)."""
    if cfg.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = apply_temperature(logits.float(), cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    return categorical(torch.softmax(logits, dim=-1), generator)


def categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (B, V) by the inverse of its running sum: one uniform per row, placed
    among the row's cumulative probabilities. torch.multinomial draws an exponential for every entry
    instead (B x V of them): at 64 rows of 65 characters it took 115 us a character where this takes
    21-29 (docs/speed.md). A character of probability 0 is never drawn; probabilities that are not finite
    raise multinomial's RuntimeError ("probability tensor contains ..."), which draw() reports."""
    cum = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=cum.dtype, device=cum.device)
    idx = torch.searchsorted(cum, u.mul_(cum[:, -1:]), right=True).view(-1)  # first cum > u
    if int(idx.max()) >= probs.shape[-1]:  # NaN or inf in the row, or u rounded up to the row's total
        return _past_the_end(probs, cum, idx)
    return idx


def _past_the_end(probs: torch.Tensor, cum: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows a draw found no character for: an error when their probabilities are not finite, else
    (u rounded up to the total, about once in 2^24 draws) the row's last character of nonzero probability."""
    total = cum[:, -1]
    if not bool(torch.isfinite(total).all()) or bool((total <= 0).any()):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
    return torch.minimum(idx, last)


# ---------------------------------------------------------------- guidance


def guided_logits(own: torch.Tensor, other: torch.Tensor, guidance: float) -> torch.Tensor:
    """What --guidance draws from (B, V): log p_own + g * (log p_own - log p_other) on the characters
    the own stream finds plausible (at least GUIDANCE_PLAUSIBLE times as likely as its likeliest
    one), -inf on the others.

    Without the cut this is p_own^(1+g) / p_other^g: a character gains by being unlikely under the
    opposite stream, however unlikely it is under its own. The ratio is noise wherever the model
    never learnt anything, in the far tail (rare non-ASCII characters the head only learnt to push
    down), so a tail character gets drawn now and then; after it both streams run on text unlike
    anything they trained on, their difference is noise on every character, and the sample turns
    into soup for good (measured in docs/sentiment.md). Contrasting only among the own stream's
    plausible characters keeps what the unit changes there and never draws what the own stream
    rules out."""
    own, other = torch.log_softmax(own.float(), -1), torch.log_softmax(other.float(), -1)  # (B, V)
    mixed = own + guidance * (own - other)
    plausible = own >= own.max(dim=-1, keepdim=True).values + math.log(GUIDANCE_PLAUSIBLE)
    return mixed.masked_fill(~plausible, float("-inf"))


# ---------------------------------------------------------------- generation


def clean_prime(prime: str, vocab: Vocab) -> tuple[str, str]:
    """(the prime without characters unknown to the vocabulary, the unknown characters)."""
    known = set(vocab.chars)
    kept = "".join(c for c in prime if c in known)
    unknown = "".join(dict.fromkeys(c for c in prime if c not in known))
    return kept, unknown


def default_prime(vocab: Vocab) -> str:
    return "\n" if "\n" in vocab.chars else vocab.chars[0]


def generate(model: CharRNN, vocab: Vocab, cfg: SampleConfig,
             on_chars: Callable[[list[str]], None] | None = None,
             hook=None, lexicon: Lexicon | None = None) -> list[str]:
    """Generate `cfg.num` samples; each is the prime (unknown characters already removed) and what follows it.

    `on_chars` receives each step's newly final text of every sample (see `stream_chars`), so the
    caller can stream it. Returns the full texts, so memory grows with num * length; `stream_chars`
    keeps nothing. `hook`, `cfg` and `lexicon` as in `stream_chars`.
    """
    out = None
    for chars in stream_chars(model, vocab, cfg, hook, lexicon):
        if out is None:  # made after the model's state, so a --num too large fails there, at once
            out = [[] for _ in chars]
        for buf, ch in zip(out, chars):
            buf.append(ch)
        if on_chars is not None:
            on_chars(chars)
    return [cfg.prime + "".join(buf) for buf in out] if out is not None else [cfg.prime] * cfg.num


def draw(logits: torch.Tensor, n: int, cfg: SampleConfig, generator: torch.Generator, step: int) -> torch.Tensor:
    """The next character ids (n,) of n samples from their rows' logits: n rows, or 2n with guidance
    (own rows first, the opposite-fixed rows after). `step` (0-based) only numbers the character in an error."""
    if logits.shape[0] > n:
        logits = guided_logits(logits[:n], logits[n:], cfg.guidance)
    try:
        return pick(logits.cpu(), cfg, generator)  # sampling on CPU keeps seeds portable across devices
    except RuntimeError as e:  # categorical's "probability tensor contains either inf, nan or element < 0"
        if "probability tensor" not in str(e):
            raise
        raise CheckpointError(
            f"the model's next-character probabilities are not finite at generated character {step + 1} (NaN "
            "or infinite weights in the checkpoint, or a fixed --value too large); check the checkpoint with "
            "'charrnn eval CHECKPOINT FILE'") from None


def speller_for(cfg: SampleConfig, lexicon: Lexicon | None, vocab: Vocab, n: int) -> Speller | None:
    """The speller of n samples with --words known and a lexicon, else None."""
    return Speller(lexicon, vocab.chars, n) if cfg.words == "known" and lexicon is not None else None


def seeded_generator(seed: int | None) -> torch.Generator:
    """The CPU generator every draw of one sampling run uses: seeded, or from fresh entropy when seed is None."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@torch.no_grad()
def stream_chars(model: CharRNN, vocab: Vocab, cfg: SampleConfig, hook=None,
                 lexicon: Lexicon | None = None) -> Iterator[list[str]]:
    """Yield the next character of every sample, `cfg.length` times, after feeding the prime
    (`cfg.prime`, or default_prime). Nothing is kept between steps, so any length runs in constant memory.

    With stop strings (`cfg.stop`) each sample's item is its newly final text instead: '' while
    characters that may begin a match are held back, several characters once they are not, '' after
    the sample stopped (charrnn/stops.py). Generation ends as soon as every sample has stopped.

    `hook(layer, t, state) -> state`, if given, may edit each layer's state at every step before the
    layers above read it (used to fix a unit's value; see charrnn/model.py).
    `cfg.precision` decides whether a bf16 copy of the model samples (see choose_precision).

    With `cfg.guidance` g > 0 the batch has 2 * num rows: row i and row num + i read the same text,
    and `hook` must fix the unit one way on the first num rows and the opposite way on the others
    (neuron.steering_hook(..., guided_rows=num) builds it). The next character is drawn from
    log p_i + g * (log p_i - log p_{num+i}): what the fixed value changes, amplified, among the characters
    row i finds plausible (guided_logits).

    With `cfg.words` "known" and the model's `lexicon` (None for a checkpoint from before lexicons),
    a character that would spell a word the corpus does not have is never drawn (charrnn/lexicon.py).
    """
    validate(cfg)
    n = cfg.num
    rows = 2 * n if cfg.guidance > 0 else n
    model = with_precision(model, choose_precision(model, cfg.precision, rows)).eval()
    device = model.head.weight.device
    gen = seeded_generator(cfg.seed)
    ids = vocab.encode(cfg.prime or default_prime(vocab))
    state = model.init_state(rows, device)
    logits = None
    stops = StopStrings(cfg.stop, n, cfg.stop_keep) if cfg.stop else None
    speller = speller_for(cfg, lexicon, vocab, n)
    for i in ids:  # feed the prime one character at a time, so a hook sees every step
        x = torch.full((rows,), i, dtype=torch.long, device=device)
        logits, state = model.step(x, state, hook)
        if speller is not None:
            speller.feed(x[:n])
    for step in range(cfg.length):
        if speller is not None:
            logits = speller.restrict(logits)
        nxt = draw(logits, n, cfg, gen, step)
        if speller is not None:
            speller.feed(nxt)
        chars = [vocab.chars[j] for j in nxt.tolist()]
        if stops is None:
            yield chars
        else:
            yield stops.feed(chars)
            if stops.all_stopped:
                return  # every sample has ended: not one model step more
        feed = nxt if rows == n else nxt.repeat(rows // n)  # guided: the shadow rows read the same text
        logits, state = model.step(feed if feed.device == device else feed.to(device), state, hook)
    if stops is not None:
        held = stops.flush()  # the samples reached --length while a possible match was held back
        if any(held):
            yield held
