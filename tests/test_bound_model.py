"""The bound unit (ModelConfig.bound_unit, train --sentiment-unit): the fused path gives the numbers of
holding the unit's h step by step, the unit is held at 0 unless written, and what it reads is its own."""

import pytest
import torch

from charrnn.model import CharRNN, ModelConfig, Write


def _model(cell: str, layers: int = 2, unit: int = 3, dropout: float = 0.0) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=11, cell=cell, layers=layers, hidden=8, embed=5,
                               dropout=dropout, bound_unit=unit)).double()


def _no_op(layer, t, state):  # a hook that changes nothing: forces the step-by-step path
    return state


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2])
def test_the_fused_path_gives_the_step_by_step_numbers(cell, layers):
    m = _model(cell, layers)
    idx = torch.randint(11, (4, 9))
    values = torch.randn(4, 9, dtype=torch.float64).tanh()
    state = tuple(s.double() + 0.1 for s in m.init_state(4))
    fast, slow = Write(values), Write(values)
    logits_f, _, st_f = m(idx, state=state, write=fast)
    logits_s, _, st_s = m(idx, state=state, write=slow, hook=_no_op)
    torch.testing.assert_close(logits_f, logits_s)
    for a, b in zip(st_f, st_s):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fast.read, slow.read)  # the unit's own cell state (or h) at every step
    if cell == "lstm":
        torch.testing.assert_close(fast.read[:, -1], st_f[1][-1, :, 3])
    assert torch.equal(st_f[0][-1, :, 3], values[:, -1])  # h holds the written value


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_gradients_agree_between_the_two_paths(cell):
    m = _model(cell)
    idx, y = torch.randint(11, (3, 6)), torch.randint(11, (3, 6))
    values = torch.randn(3, 6, dtype=torch.float64).tanh()
    grads = []
    for hook in (None, _no_op):
        m.zero_grad()
        w = Write(values)
        _, loss, _ = m(idx, y, write=w, hook=hook)
        (loss + w.read.square().mean()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", ["lstm", "gru", "mlstm"])
def test_unwritten_the_unit_is_held_at_zero_in_forward_and_step(cell):
    m = _model(cell).eval()
    idx = torch.randint(11, (2, 7))
    logits, _, state = m(idx)
    zero = Write(torch.zeros(2, 7, dtype=torch.float64))
    logits0, _, _ = m(idx, write=zero)
    torch.testing.assert_close(logits, logits0)
    assert torch.all(state[0][-1, :, 3] == 0)
    # one step at a time (sampling) gives what the whole sequence gave
    st = tuple(s.double() for s in m.init_state(2))
    for t in range(7):
        step_logits, st = m.step(idx[:, t], st)
        torch.testing.assert_close(step_logits, logits[:, t])


def test_the_written_value_changes_what_it_writes_and_an_unbound_model_is_unchanged():
    m = _model("lstm").eval()
    idx = torch.randint(11, (2, 5))
    plus, _, _ = m(idx, write=Write(torch.full((2, 5), 0.9, dtype=torch.float64)))
    minus, _, _ = m(idx, write=Write(torch.full((2, 5), -0.9, dtype=torch.float64)))
    assert (plus - minus).abs().max() > 1e-3
    torch.manual_seed(0)
    plain = CharRNN(ModelConfig(vocab_size=11, layers=2, hidden=8, embed=5)).double()
    torch.manual_seed(0)
    same = CharRNN(ModelConfig(vocab_size=11, layers=2, hidden=8, embed=5)).double()
    torch.testing.assert_close(plain(idx)[0], same(idx, hook=_no_op)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_second_pass_for_some_rows_equals_running_them_alone(cell):
    """The contrast of train --sentiment-unit: rows run again with other values share the layers below."""
    m = _model(cell)
    idx = torch.randint(11, (5, 6))
    values = torch.randn(5, 6, dtype=torch.float64).tanh()
    state = tuple(s.double() + 0.05 for s in m.init_state(5))
    rows = torch.tensor([1, 3])
    w = Write(values, rows=rows, other=-values[rows])
    m(idx, state=state, write=w)
    alone, _, _ = m(idx[rows], state=tuple(s[:, rows] for s in state), write=Write(-values[rows]))
    torch.testing.assert_close(w.other_logits, alone)


def test_the_contrast_waits_for_the_language_model_then_rises_to_its_weight():
    from charrnn.config import SentimentConfig
    from charrnn.neuron.bind import contrast_weight

    sc = SentimentConfig(unit=True, contrast=5.0, contrast_from=0.25)
    weights = [contrast_weight(sc, step, 1000) for step in (0, 249, 250, 375, 500, 999)]
    assert weights == [0.0, 0.0, 0.0, 2.5, 5.0, 5.0]
    assert contrast_weight(sc, 10, 0) == 5.0  # the schedule's length unknown: the full weight
    assert contrast_weight(SentimentConfig(unit=True, contrast=5.0, contrast_from=0.0), 0, 1000) == 5.0


def test_bad_binding_settings_are_refused_in_one_line():
    from charrnn.config import SentimentConfig, TrainConfig, validate
    from charrnn.errors import UsageError

    for bad in (dict(contrast_rows=0), dict(contrast_from=0.6), dict(contrast_from=-0.1)):
        with pytest.raises(UsageError) as e:
            validate(TrainConfig(sentiment=SentimentConfig(unit=True, **bad)))
        assert "\n" not in str(e.value)


def test_a_gru_holds_values_at_the_edge_of_tanh_in_float32():
    """The GRU's fused path carries the value through tanh(atanh(v)): v = +-1 (tanh of a large fix value in
    float32) must still give the step-by-step numbers, not infinities."""
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=11, cell="gru", layers=2, hidden=8, embed=5, bound_unit=3))
    idx = torch.randint(11, (3, 7))
    values = torch.tensor([1.0, -1.0, 0.0]).repeat_interleave(7).view(3, 7)
    fast, slow = Write(values), Write(values)
    logits_f, _, _ = m(idx, write=fast)
    logits_s, _, _ = m(idx, write=slow, hook=_no_op)
    assert torch.isfinite(logits_f).all() and torch.isfinite(fast.read).all()
    torch.testing.assert_close(logits_f, logits_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.read, slow.read, atol=1e-5, rtol=1e-5)
