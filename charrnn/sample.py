"""Sampling text from a model: temperature, top-k and top-p filters, and a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from charrnn.data import Vocab
from charrnn.errors import UsageError
from charrnn.model import CharRNN


@dataclass
class SampleConfig:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely characters; 0: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: all
    length: int = 500  # characters to generate after the prime
    prime: str = ""  # text to start from; empty: a newline (or the first character of the vocabulary)
    seed: int | None = None  # same seed, same text; None: random
    num: int = 1  # independent samples, generated together as one batch


def validate(cfg: SampleConfig) -> None:
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


# ---------------------------------------------------------------- filters (logits -> logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- generation


def clean_prime(prime: str, vocab: Vocab) -> tuple[str, str]:
    """(the prime without characters unknown to the vocabulary, the unknown characters)."""
    known = set(vocab.chars)
    kept = "".join(c for c in prime if c in known)
    unknown = "".join(dict.fromkeys(c for c in prime if c not in known))
    return kept, unknown


def default_prime(vocab: Vocab) -> str:
    return "\n" if "\n" in vocab.chars else vocab.chars[0]


@torch.no_grad()
def generate(model: CharRNN, vocab: Vocab, cfg: SampleConfig,
             on_chars: Callable[[list[str]], None] | None = None,
             hook=None) -> list[str]:
    """Generate `cfg.num` samples; each starts with the prime (unknown characters already removed).

    `on_chars` receives the newly generated character of every sample at each step, so the
    caller can stream them. `hook(layer, t, state) -> state`, if given, may edit each layer's state
    at every step before the layers above read it (used to fix a unit's value; see charrnn/model.py). Returns the full texts, prime included.
    """
    validate(cfg)
    model.eval()
    device = model.head.weight.device
    gen = torch.Generator(device="cpu")
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    prime = cfg.prime or default_prime(vocab)
    ids = vocab.encode(prime)
    state = model.init_state(cfg.num, device)
    logits = None
    for i in ids:  # feed the prime one character at a time, so a hook sees every step
        x = torch.full((cfg.num,), i, dtype=torch.long, device=device)
        logits, state = model.step(x, state, hook)
    out = [[] for _ in range(cfg.num)]
    for _ in range(cfg.length):
        nxt = pick(logits.cpu(), cfg, gen)  # sampling on CPU keeps seeds portable across devices
        chars = [vocab.chars[j] for j in nxt.tolist()]
        for buf, ch in zip(out, chars):
            buf.append(ch)
        if on_chars is not None:
            on_chars(chars)
        logits, state = model.step(nxt.to(device), state, hook)
    return [prime + "".join(buf) for buf in out]
