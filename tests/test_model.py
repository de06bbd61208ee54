"""The model contract: shapes, state handling, and step() agreeing with forward()."""

import pytest
import torch

from charrnn.model import CELLS, CharRNN, ModelConfig


@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes_and_loss(cell):
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=11, cell=cell, layers=2, hidden=16))
    idx = torch.randint(0, 11, (3, 7))
    logits, loss, state = m(idx)
    assert logits.shape == (3, 7, 11) and loss is None
    assert all(s.shape == (2, 3, 16) for s in state)
    _, loss, _ = m(idx, idx)
    assert loss.ndim == 0 and loss.item() > 0


@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_forward(cell):
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=9, cell=cell, layers=2, hidden=8)).eval()
    idx = torch.randint(0, 9, (2, 5))
    logits, _, state = m(idx)
    st = m.init_state(2)
    for t in range(5):
        step_logits, st = m.step(idx[:, t], st)
        assert torch.allclose(step_logits, logits[:, t], atol=1e-5)
    for a, b in zip(st, state):
        assert torch.allclose(a, b, atol=1e-5)


def test_state_carries_information():
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=5, cell="lstm", layers=1, hidden=8)).eval()
    idx = torch.tensor([[1, 2, 3]])
    _, _, state = m(idx)
    a, _, _ = m(idx, state=state)
    b, _, _ = m(idx)
    assert not torch.allclose(a, b)
    detached = m.detach_state(state)
    assert all(not s.requires_grad for s in detached)


def test_model_learns_a_repeating_pattern():
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=4, cell="lstm", layers=1, hidden=16))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    seq = torch.tensor([[0, 1, 2, 3] * 8])
    for _ in range(100):
        _, loss, _ = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
