"""The model contract: shapes, state handling, and step() agreeing with forward()."""

import copy

import pytest
import torch

from charrnn.model import CELLS, CharRNN, ModelConfig, _packed_linear


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


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_sampling_folds_the_embedding_into_the_first_layer_and_follows_changed_weights(cell):
    """Without autograd a fused model's step reads layer 0's input through W_ih0 E^T and a one-hot row:
    the numbers of embedding then W_ih0, recomputed when either weight changes (an optimizer step, in place)."""
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=9, cell=cell, layers=2, hidden=16, embed=12)).eval()
    idx = torch.randint(9, (3, 6))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for round_ in range(2):
        logits, _, _ = m(idx)
        with torch.no_grad():
            st = m.init_state(3)
            for t in range(6):
                step_logits, st = m.step(idx[:, t], st)
                torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
        assert "_folded" in m.__dict__  # the folded path ran
        # the step runs on weights laid out for oneDNN's linear where this PyTorch has it
        assert (m.__dict__.get("_packed") is not None) == (_packed_linear(torch.float32) is not None)
        _, loss, _ = m.train()(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()  # changes the embedding and W_ih0 in place: the next round must not reuse the old table
        m.eval()
    with torch.no_grad():  # the biases are folded too (into the table, or summed): a change to one alone counts
        m.rnn.bias_hh_l0.add_(0.5)
        m.rnn.bias_ih_l1.sub_(0.25)
        logits, _, _ = m(idx)
        st = m.init_state(3)
        for t in range(6):
            step_logits, st = m.step(idx[:, t], st)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
    wide = CharRNN(ModelConfig(vocab_size=40, cell=cell, layers=1, hidden=8, embed=8)).eval()
    with torch.no_grad():
        wide.step(torch.tensor([1]), wide.init_state(1))
    assert "_folded" not in wide.__dict__  # a vocabulary wider than the embedding: nothing to gain


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sampling_step_with_a_hook_gives_the_forward_pass_numbers_in_fp32_and_bf16(cell, dtype):
    """The step that samples (oneDNN's linear on laid-out weights where PyTorch has it, addmm elsewhere)
    against the forward pass, one unit of each layer fixed by a hook, over 3 layers: the same numbers in
    fp32; in bf16 the same up to bf16's rounding."""
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=9, cell=cell, layers=3, hidden=32, embed=16)).eval()

    def hook(layer, t, state):
        fixed = [s.clone() for s in state]
        fixed[-1][:, layer] = 3.0 if cell == "lstm" else 0.9  # C for the LSTM, h for the GRU and RNN
        return tuple(fixed)

    idx = torch.randint(9, (4, 7))
    with torch.no_grad():
        want, _, _ = m(idx, hook=hook)
        low = copy.deepcopy(m).to(dtype)
        st = low.init_state(4)
        for t in range(7):
            got, st = low.step(idx[:, t], st, hook)
            assert got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(got.float(), want[:, t], atol=tol, rtol=tol)
    assert (low.__dict__.get("_packed") is not None) == (_packed_linear(dtype) is not None)


def test_a_copy_of_a_model_that_sampled_leaves_its_sampling_caches_behind():
    """Sampling keeps a folded table, weights laid out for oneDNN (opaque tensors, which cannot be copied)
    and a bf16 copy on the model; copy.deepcopy of it works, gives the same numbers, and starts without them."""
    from charrnn.sample import with_precision

    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=9, cell="lstm", layers=2, hidden=16, embed=12)).eval()
    idx = torch.randint(9, (3,))
    with torch.no_grad():
        want, _ = m.step(idx, m.init_state(3))
        with_precision(m, "bf16")
        assert {"_folded", "_precision_copy"} <= set(m.__dict__)
        twin = copy.deepcopy(m)
        assert not set(CharRNN.SAMPLING_CACHES) & set(twin.__dict__)
        got, _ = twin.step(idx, twin.init_state(3))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert twin.rnn.weight_hh_l0.data_ptr() != m.rnn.weight_hh_l0.data_ptr()  # a copy, not a view
