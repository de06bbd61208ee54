"""The validation loss: the text read as batched streams, each started from the state of the text before it."""

import torch

from charrnn.evaluation import evaluate
from charrnn.model import CharRNN, ModelConfig

PERIOD, VOCAB = 16, 4  # a cycle of 16 over 4 characters: the next one depends on several before it


def _cycle_model() -> tuple[CharRNN, torch.Tensor]:
    """A small LSTM trained until it predicts a random cycle: from a zero state a stream's first characters
    are guesses (one or two characters do not say where in the cycle it is), after a few near certain."""
    torch.manual_seed(0)
    cycle = torch.randint(VOCAB, (PERIOD,))
    text = cycle.repeat(1000)
    model = CharRNN(ModelConfig(VOCAB, "lstm", 1, 32, 8, 0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        start = torch.randint(0, len(text) - 33, (16,))
        chunk = torch.stack([text[s : s + 33] for s in start.tolist()])
        _, loss, _ = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, text


def test_streams_start_from_the_text_before_them():
    model, text = _cycle_model()
    whole, n_whole = evaluate(model, text, streams=1)
    cold, n_cold = evaluate(model, text, streams=64, context=0)
    warm, n_warm = evaluate(model, text, streams=64)
    assert n_cold == n_warm  # the context is read, not scored
    assert whole < 0.05  # the model knows the cycle
    assert cold > whole + 0.003  # 64 streams from zero: each one's first characters are guesses
    assert abs(warm - whole) < 1e-4  # from the text before them: as if read in one piece


def test_context_is_clamped_to_the_stream_and_keeps_the_model_mode():
    model, text = _cycle_model()
    model.train()
    short = text[:700]
    loss, n = evaluate(model, short, streams=4, seq_len=16, context=10_000)  # more than a stream holds
    assert model.training
    assert n == 4 * (len(short) // 4 - 1)
    assert abs(loss - evaluate(model, short, streams=1, seq_len=16)[0]) < 1e-3
