"""The lecture's cells (peephole, coupled, mLSTM) against their equations, the shared step-by-step path, and `charrnn gradients`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from charrnn import checkpoint as ckm
from charrnn.model import (
    CELLS, CUSTOM_CELLS, FUSED_CELLS, CharRNN, CoupledLSTM, ModelConfig, MultiplicativeLSTM, PeepholeLSTM, _times_t, recur,
)
from conftest import TINY, run_cli


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def set_params(cell, **values) -> None:
    with torch.no_grad():
        for name, v in values.items():
            getattr(cell, name).copy_(torch.tensor(v, dtype=torch.float32))


def run_two_steps(cell, xs: list[float], h: float, c: float) -> list[float]:
    """A 1-unit cell on 1-feature inputs, B = 1, step by step through in_proj and step: [h1, c1, h2, c2]."""
    state = (torch.tensor([[h]]), torch.tensor([[c]]))
    out = []
    for x in xs:
        state = cell.step(cell.in_proj(torch.tensor([[x]])), state)
        out += [state[0].item(), state[1].item()]
    return out


# ---------------------------------------------------------------- the equations, by hand


def test_peephole_matches_hand_computed_equations():
    cell = PeepholeLSTM(1, 1)
    # gate rows i, f, g, o
    a, u, b = [0.5, -0.3, 0.8, 0.2], [0.4, 0.1, -0.6, 0.7], [0.1, 1.0, 0.0, -0.2]
    p_i, p_f, p_o = 0.3, -0.5, 0.9
    set_params(cell, weight_ih=[[v] for v in a], weight_hh=[[v] for v in u], bias=b, peep=[[p_i], [p_f], [p_o]])
    h, c = 0.2, -0.4
    expected = []
    for x in (1.0, -2.0):
        i = sig(a[0] * x + u[0] * h + b[0] + p_i * c)  # sees C_{t-1}
        f = sig(a[1] * x + u[1] * h + b[1] + p_f * c)  # sees C_{t-1}
        g = math.tanh(a[2] * x + u[2] * h + b[2])
        c = f * c + i * g
        o = sig(a[3] * x + u[3] * h + b[3] + p_o * c)  # sees C_t
        h = o * math.tanh(c)
        expected += [h, c]
    assert run_two_steps(cell, [1.0, -2.0], 0.2, -0.4) == pytest.approx(expected, abs=1e-6)


def test_coupled_matches_hand_computed_equations():
    cell = CoupledLSTM(1, 1)
    a, u, b = [0.7, -0.4, 0.3], [-0.2, 0.9, 0.5], [0.5, 0.1, -0.1]  # rows f, g, o
    set_params(cell, weight_ih=[[v] for v in a], weight_hh=[[v] for v in u], bias=b)
    h, c = -0.3, 0.6
    expected = []
    for x in (0.5, 1.5):
        f = sig(a[0] * x + u[0] * h + b[0])
        g = math.tanh(a[1] * x + u[1] * h + b[1])
        c = f * c + (1 - f) * g  # the input gate is 1 - f
        h = sig(a[2] * x + u[2] * h + b[2]) * math.tanh(c)
        expected += [h, c]
    assert run_two_steps(cell, [0.5, 1.5], -0.3, 0.6) == pytest.approx(expected, abs=1e-6)


def test_mlstm_matches_hand_computed_equations():
    cell = MultiplicativeLSTM(1, 1)
    a, w, b = [0.3, -0.7, 0.6, 0.4], [0.8, 0.2, -0.5, 1.1], [0.0, 0.5, 0.1, -0.3]  # rows i, f, g, o; w acts on m
    w_mx, w_mh = 1.5, -0.8
    set_params(cell, weight_ih=[[v] for v in a], weight_hh=[[v] for v in w], bias=b,
               weight_mx=[[w_mx]], weight_mh=[[w_mh]])
    h, c = 0.5, 0.1
    expected = []
    for x in (1.0, -0.5):
        m = (w_mx * x) * (w_mh * h)  # m_t = (W_mx x_t) * (W_mh h_{t-1})
        i, f, g, o = (a[j] * x + w[j] * m + b[j] for j in range(4))  # gates from x_t and m_t, not h_{t-1}
        c = sig(f) * c + sig(i) * math.tanh(g)
        h = sig(o) * math.tanh(c)
        expected += [h, c]
    assert run_two_steps(cell, [1.0, -0.5], 0.5, 0.1) == pytest.approx(expected, abs=1e-6)


def test_mlstm_product_is_elementwise_over_units():
    torch.manual_seed(0)
    cell = MultiplicativeLSTM(3, 2)
    x, h, c = torch.randn(1, 3), torch.randn(1, 2), torch.randn(1, 2)
    m = (x @ cell.weight_mx.t()) * (h @ cell.weight_mh.t())  # (1, 2)
    z = x @ cell.weight_ih.t() + m @ cell.weight_hh.t() + cell.bias
    i, f, g, o = z.chunk(4, 1)
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new, c_new = cell.step(cell.in_proj(x), (h, c))
    torch.testing.assert_close(c_new, c_ref)
    torch.testing.assert_close(h_new, torch.sigmoid(o) * torch.tanh(c_ref))


# ---------------------------------------------------------------- one recurrence path


@pytest.mark.parametrize("cell", FUSED_CELLS)
def test_fused_cells_through_the_step_path_match_pytorch(cell):
    """With a hook, lstm/gru/rnn run through the shared per-step path: same values and gradients as nn.LSTM/GRU/RNN."""
    torch.manual_seed(1)
    m = CharRNN(ModelConfig(vocab_size=7, cell=cell, layers=2, hidden=6, embed=4))
    idx, y = torch.randint(0, 7, (3, 9)), torch.randint(0, 7, (3, 9))
    state = tuple(torch.randn_like(s) for s in m.init_state(3))
    logits_a, loss_a, state_a = m(idx, y, state)
    grads_a = torch.autograd.grad(loss_a, list(m.parameters()))
    logits_b, loss_b, state_b = m(idx, y, state, hook=lambda layer, t, s: s)
    grads_b = torch.autograd.grad(loss_b, list(m.parameters()))
    torch.testing.assert_close(logits_b, logits_a, atol=1e-6, rtol=1e-5)
    for a, b in zip(state_a + grads_a, state_b + grads_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_fused_cells_keep_their_parameter_names():
    names = set(CharRNN(ModelConfig(vocab_size=5, cell="lstm", layers=2, hidden=4)).state_dict())
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l1", "rnn.bias_ih_l1", "rnn.bias_hh_l0"} <= names


def test_lstm_like_cells_carry_h_and_c():
    for cell in CELLS:
        state = CharRNN(ModelConfig(vocab_size=6, cell=cell, layers=2, hidden=5)).init_state(3)
        assert len(state) == (1 if cell in ("gru", "rnn") else 2), cell


@pytest.mark.parametrize("cell", ["lstm", "mlstm"])
def test_hook_fixes_a_unit_of_the_top_layer(cell):
    torch.manual_seed(3)
    m = CharRNN(ModelConfig(vocab_size=6, cell=cell, layers=2, hidden=5)).eval()
    idx = torch.randint(0, 6, (2, 8))
    seen = []

    def fix(layer, t, state):
        seen.append((layer, t))
        if layer != 1:
            return state
        c = state[-1].clone()
        c[:, 3] = 1.0
        return state[:-1] + (c,)

    logits, _, state = m(idx, hook=fix)
    assert seen == [(l, t) for l in range(2) for t in range(8)]
    assert torch.all(state[-1][1, :, 3] == 1.0)
    assert not torch.allclose(logits, m(idx)[0])


# ---------------------------------------------------------------- every cell through the CLI


@pytest.mark.parametrize("cell", CUSTOM_CELLS)
def test_cell_trains_resumes_exactly_samples_and_evaluates(cell, corpus):
    r = run_cli("train", corpus, "--cell", cell, *TINY, "--steps", "6", "--eval-every", "3", "--keep", "5", "--run", "a")
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in open("a/metrics.jsonl")]
    assert any("grad_norm" in l for l in lines)  # the training loop's gradient norm, before clipping
    # resume from the step-3 checkpoint of a copy: it must reach the same step-6 weights
    shutil.copytree("a", "b")
    for p in ("b/" + ckm.ckpt_name(6), "b/step_00000006.json"):
        shutil.os.remove(p)
    r = run_cli("train", "--resume", "b", "-q")
    assert r.exit_code == 0, r.output
    a = ckm.load("a/" + ckm.ckpt_name(6))["model"]
    b = ckm.load("b/" + ckm.ckpt_name(6))["model"]
    assert a.keys() == b.keys() and any(k.startswith("cells.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r = run_cli("sample", "a", "--length", "30", "--seed", "1", "--prime", "The")
    assert r.exit_code == 0 and r.stdout.startswith("The") and len(r.stdout.strip()) >= 30
    r = run_cli("eval", "a", corpus, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["loss"] > 0


def test_unknown_cell_is_a_usage_error(corpus):
    r = run_cli("train", corpus, "--cell", "nlstm", *TINY, "--steps", "2")
    assert r.exit_code == 2


# ---------------------------------------------------------------- gradient flow


def test_gradient_flow_matches_a_direct_computation():
    """|d loss_T / d h_{T-k}| from the hook equals the gradient taken by restarting the fused RNN from a leaf state."""
    from charrnn.gradients import gradient_flow

    torch.manual_seed(4)
    m = CharRNN(ModelConfig(vocab_size=5, cell="rnn", layers=1, hidden=8))
    data = torch.randint(0, 5, (40,))
    k = 6
    res = gradient_flow(m, data, k=k, windows=1)
    idx, target = data[: k + 1][None], data[k + 1][None]
    for j in (1, 3, 6):
        cut = k - j + 1  # h after inputs 0..k-j
        with torch.no_grad():
            _, _, state = m(idx[:, :cut])
        h = state[0].clone().requires_grad_()
        logits, _, _ = m(idx[:, cut:], state=(h,))
        F.cross_entropy(logits[:, -1], target).backward()
        assert res["norms"][0][j - 1] == pytest.approx(h.grad.norm().item(), rel=1e-4)


def test_gradients_command_table_and_json(corpus):
    assert run_cli("train", corpus, "--cell", "lstm", *TINY, "--layers", "2", "--steps", "2", "--run", "g").exit_code == 0
    r = run_cli("gradients", "g", corpus, "--k", "12", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["k"] == list(range(1, 13)) and len(out["norms"]) == 2
    assert all(len(row) == 12 and all(v > 0 for v in row) for row in out["norms"])
    r = run_cli("gradients", "g", corpus, "--k", "5")
    assert r.exit_code == 0 and r.stdout == ""
    assert "k=5" in r.stderr


def test_gradients_command_failures(corpus, tmp_path):
    assert run_cli("train", corpus, "--cell", "rnn", *TINY, "--steps", "2", "--run", "g").exit_code == 0
    short = tmp_path / "short.txt"
    short.write_text("The king")
    r = run_cli("gradients", "g", short, "--k", "50")
    assert r.exit_code == 2 and "lower --k" in r.stderr
    r = run_cli("gradients", "nowhere", corpus)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1


# ---------------------------------------------------------------- the mLSTM's whole-sequence path


def identity(layer, t, state):
    """A hook that changes nothing: it sends every layer through the step-by-step equations (`recur`)."""
    return state


def mlstm_and_batch(dtype, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = CharRNN(ModelConfig(vocab_size=7, cell="mlstm", layers=2, hidden=6, embed=4, dropout=dropout)).to(dtype)
    idx, y = torch.randint(0, 7, (3, 9)), torch.randint(0, 7, (3, 9))
    state = tuple(torch.randn_like(s) for s in m.init_state(3))
    return m, idx, y, state


def outputs_and_grads(m, idx, y, state, hook=None, seed=0):
    """Logits, final state and the gradients of every parameter and of the initial state, for a
    loss that also reads the final state (as a carried state's next window would)."""
    state = tuple(s.clone().requires_grad_() for s in state)
    torch.manual_seed(seed)  # the same dropout masks for both paths
    logits, loss, final = m(idx, y, state, hook=hook)
    total = loss + (final[0] * 0.7).sum() + (final[1] * -1.3).sum()
    grads = torch.autograd.grad(total, list(m.parameters()) + list(state))
    return [logits, *final, *grads]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mlstm_whole_sequence_matches_the_step_equations(dtype, tol, dropout):
    """The hand-written forward and backward give the step loop's outputs, final state and every gradient
    (parameters and initial state), with a non-zero initial state and with dropout between layers."""
    m, idx, y, state = mlstm_and_batch(dtype, dropout)
    m.train()
    fast = outputs_and_grads(m, idx, y, state)
    slow = outputs_and_grads(m, idx, y, state, hook=identity)
    assert len(fast) == 2 + 1 + len(list(m.parameters())) + 2
    for a, b in zip(fast, slow):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("cell,hook", [("mlstm", None), ("mlstm", identity), ("peephole", None), ("coupled", None),
                                       ("lstm", identity), ("gru", identity)])
def test_first_layer_reads_a_row_per_character(cell, hook):
    """Layer 0's input projections are gathered from a table with one row per character (the layer's
    in_proj of the embedding's rows) instead of a matmul over every embedded character: the logits, final
    state and every gradient equal the equations' way, each character embedded and then projected."""
    torch.manual_seed(3)
    m = CharRNN(ModelConfig(vocab_size=7, cell=cell, layers=1, hidden=6, embed=4)).double()
    idx, y = torch.randint(0, 7, (3, 9)), torch.randint(0, 7, (3, 9))
    state = tuple(torch.randn_like(s) for s in m.init_state(3))
    logits, loss, final = m(idx, y, tuple(s.clone() for s in state), hook=hook)
    grads = torch.autograd.grad(loss + final[0].sum(), list(m.parameters()))

    layer = m.layer_cells()[0]
    out, last = recur(layer, layer.in_proj(m.embedding(idx)), tuple(s[0] for s in state))
    ref_logits = m.head(out)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, 7).float(), y.reshape(-1))  # in fp32, as the model's
    ref_grads = torch.autograd.grad(ref_loss + last[0].sum(), list(m.parameters()))
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-10)
    for a, b in zip([*final, *grads], [*(s.unsqueeze(0) for s in last), *ref_grads]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert grads[0].abs().sum() > 0  # the embedding learns through the table


def test_mlstm_products_equal_torch_matmul():
    """The whole-sequence path's products (oneDNN's linear for fp32 on a CPU that has it) equal x @ w.t(),
    also for rows that are slices of a wider buffer, as each step's dz is; float64 goes through torch.mm."""
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    for x in (torch.randn(32, 64), torch.randn(32, 80)[:, 16:]):
        torch.testing.assert_close(_times_t(x, w), x @ w.t(), atol=1e-4, rtol=1e-5)
    x64, w64 = torch.randn(8, 64, dtype=torch.float64), w.double()
    assert torch.equal(_times_t(x64, w64), x64 @ w64.t())


def test_mlstm_whole_sequence_runs_only_without_a_hook_on_the_layer():
    """A hook with first_layer = 1 sees only the top layer, and the result equals hooking every layer."""
    m, idx, y, state = mlstm_and_batch(torch.float64)
    seen = []

    def top_only(layer, t, s):
        seen.append(layer)
        return s

    top_only.first_layer = 1
    fast_bottom = outputs_and_grads(m, idx, y, state, hook=top_only)
    assert set(seen) == {1} and len(seen) == idx.shape[1]
    for a, b in zip(fast_bottom, outputs_and_grads(m, idx, y, state, hook=identity)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_mlstm_sampling_steps_match_the_whole_sequence():
    """`step`, one character at a time (sampling), reads the same logits as training's whole-sequence path."""
    m, idx, _, state = mlstm_and_batch(torch.float64)
    m.eval()
    with torch.no_grad():
        logits, _, final = m(idx, state=state)
        s = state
        for t in range(idx.shape[1]):
            step_logits, s = m.step(idx[:, t], s)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-10, rtol=1e-10)
    for a, b in zip(s, final):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_mlstm_under_autocast_falls_back_to_the_step_equations():
    """Under CPU autocast the whole-sequence backward (own-dtype maths) is not used: same numbers as the step loop."""
    m, idx, y, state = mlstm_and_batch(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = outputs_and_grads(m, idx, y, state)
        slow = outputs_and_grads(m, idx, y, state, hook=identity)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_mlstm_parameter_names_are_unchanged():
    """Old mlstm checkpoints load: the whole-sequence path adds no parameters and renames none."""
    names = set(CharRNN(ModelConfig(vocab_size=5, cell="mlstm", layers=2, hidden=4)).state_dict())
    per_layer = ("weight_ih", "weight_hh", "bias", "weight_mx", "weight_mh")
    expected = {"embedding.weight", "head.weight", "head.bias"} | {f"cells.{i}.{w}" for i in range(2) for w in per_layer}
    assert names == expected
