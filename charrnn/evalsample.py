"""The short seeded sample a run draws at each evaluation, so one can watch the text get better.

It is drawn with the run's own seed at every evaluation: the text changes because the model did,
not the dice. It uses its own random generator and the model in eval mode (no dropout draws), so
the run's random stream, and with it an exact resume, are the same with samples on or off.
"""

from __future__ import annotations

from charrnn.config import TrainConfig
from charrnn.data import Vocab
from charrnn.model import CharRNN
from charrnn.sample import SampleConfig, generate


def eval_sample(model: CharRNN, vocab: Vocab, cfg: TrainConfig) -> str | None:
    """`cfg.eval_sample_len` characters of one stream after the default prime, at `cfg.eval_sample_temp`,
    without the prime; None when samples are off. The model is left in the mode it was in."""
    if cfg.eval_sample_len <= 0:
        return None
    sc = SampleConfig(temperature=cfg.eval_sample_temp, length=cfg.eval_sample_len, seed=cfg.seed,
                      precision="fp32")  # the weights as they train: no bf16 copy
    was_training = model.training
    try:
        text = generate(model, vocab, sc)[0]
    finally:
        model.train(was_training)
    return text  # the default prime (a newline) is not part of generate's text
