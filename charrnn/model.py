"""The character-level recurrent language model: embedding, a stack of recurrent layers, a linear head.

Cells. `lstm`, `gru` and `rnn` run on PyTorch's fused kernels (nn.LSTM/GRU/RNN; their parameter
names, `rnn.weight_ih_l0` etc., are what checkpoints hold). `peephole`, `coupled` and `mlstm` are
written out below as the lecture's equations, one small `step` per cell, and share one recurrence
path (`recur`): the input projections of all time steps in one matmul, then only the recurrent
part step by step. Layer 0's input is a character's embedding, so its projections are gathered from
a table of one row per character (the layer's `in_proj` of the embedding's rows, V rows instead of
B*T): the same numbers, and the matmul over every embedded character and its two backward
matmuls are gone (1x512 mLSTM: about a third of its training step, docs/cells.md). Measured on
the 2-core CPU (benchmarks/cells.py), TorchScript gave no gain on that loop and torch.compile took
~30 s to compile and then ran slower, so nothing is compiled.
What did pay is the mLSTM's `sequence`: the whole layer as one autograd.Function (`MLSTMSequence`)
with a hand-written backward, used whenever no hook reaches the layer and autocast is off; it
gives the same numbers as `recur` over `step` (tests/test_cells.py), and trained 1.2x (one
thread) to 1.7x (two threads) faster than it (docs/cells.md). Sampling (`CharRNN.step`) still runs the cells' `step`.

State. Every cell's state is a tuple of tensors of shape (layers, B, H): (h, c) for LSTM-like
cells (lstm, peephole, coupled, mlstm), (h,) for GRU and RNN. Callers never look inside it; they
pass back what they got.

Hook. `forward(idx, targets, state, hook=hook)` runs every layer one step at a time (the fused
cells too, through the same equations on their own weights) and calls
`hook(layer, t, state) -> state` after each step t of each layer, where `state` is that layer's
tuple of (B, H) tensors ((h, c) or (h,)). Return it unchanged, or edited (e.g. one unit of the
top layer's c fixed to a value: `if layer == top: c = c.clone(); c[:, k] = v`); what it returns is
what the next step sees. Layers run bottom to top, each over the whole sequence. A hook with an
attribute `first_layer = k` promises to leave layers below k alone: those then run on the fused
kernel, or the mLSTM's whole-sequence path (the sentiment binding hooks only the top layer, and
trains at close to full speed).
Bound unit. A model with `bound_unit = k` (trained with `--sentiment-unit`) holds unit k of the top
layer's h at a written value at every step, 0 unless `forward(..., write=Write(values))` or a hook
writes it: the rest of the network reads the unit only as that value, while the unit's own cell
state (nothing else reads it) is what it reads of the text. The LSTM, GRU and RNN run this on the
fused kernel (`_bound_top`, `_bound_top_gru`); the custom cells hold the unit step by step.

`charrnn gradients` uses the hook to reach every hidden state; `step(idx, state, hook)` calls the
same hook (with t = 0) after each layer of a single step, so sampling with a fixed unit sees
exactly what training with it saw. Without autograd a fused model's `step` folds the embedding and
layer 0's biases into a table of layer 0's input projections, a row per character (`_folded_input`):
one stream is memory-bound, and a row is read instead of E columns of W_ih0 (docs/speed.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSED_CELLS = ("lstm", "gru", "rnn")
CUSTOM_CELLS = ("peephole", "coupled", "mlstm")
CELLS = FUSED_CELLS + CUSTOM_CELLS
HAS_CELL_STATE = {"lstm": True, "gru": False, "rnn": False, "peephole": True, "coupled": True, "mlstm": True}

State = tuple[torch.Tensor, ...]
LayerState = tuple[torch.Tensor, ...]  # one layer's (h, c) or (h,), each (B, H)
Hook = Callable[[int, int, LayerState], LayerState]


@dataclass
class ModelConfig:
    vocab_size: int = 65  # number of distinct characters
    cell: str = "lstm"  # one of CELLS
    layers: int = 2  # stacked recurrent layers
    hidden: int = 512  # units per recurrent layer
    embed: int = 0  # embedding width; 0 means the same as hidden
    dropout: float = 0.0  # between layers and before the head, during training only
    # a top-layer unit whose output h the network reads as written from outside: 0 unless a value is
    # written into it (`Write`, or a hook that fixes it). Set by `train --sentiment-unit` (neuron/bind.py).
    bound_unit: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def embed_dim(self) -> int:
        return self.embed or self.hidden


@dataclass
class Write:
    """What `forward` writes into the bound unit (ModelConfig.bound_unit): `values` (B, T), the unit's
    h at every step. After the call `read` (B, T) holds the unit's own value as its cell computed it
    (c, or h without a cell state): what it reads of the text, never seen by the rest of the network."""

    values: torch.Tensor
    read: torch.Tensor | None = None
    # optional: run the top layer a second time for `rows` (R,) with `other` (R, T) written, on the same
    # input from below; its logits go to `other_logits` (the fused cells' path only; else left None)
    rows: torch.Tensor | None = None
    other: torch.Tensor | None = None
    other_logits: torch.Tensor | None = None


def set_unit(s: torch.Tensor, unit: int, col: torch.Tensor) -> torch.Tensor:
    """s (..., H) with column `unit` replaced by col (...,), written out of place so autograd sees it."""
    return torch.cat([s[..., :unit], col.unsqueeze(-1).to(s.dtype), s[..., unit + 1:]], -1)


# ---------------------------------------------------------------- the cells, as equations
#
# Each cell: `in_proj(x)` maps inputs (..., E) to their share of every gate, for all steps at
# once; `step(xp, state)` takes one step's projection (B, G) and the layer's state and returns the
# new state. sigma is the logistic sigmoid.


class CustomCell(nn.Module):
    """Shared parameters: W_x (gates from x_t, with the bias) and W_h (gates from h_{t-1})."""

    n_gates = 4  # gate blocks of width H in the projections

    def __init__(self, n_in: int, hidden: int):
        super().__init__()
        g = self.n_gates * hidden
        self.hidden = hidden
        self.weight_ih = nn.Parameter(torch.empty(g, n_in))  # W_x
        self.weight_hh = nn.Parameter(torch.empty(g, hidden))  # W_h
        self.bias = nn.Parameter(torch.empty(g))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden)  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_ih, self.bias)  # (..., G)


class PeepholeLSTM(CustomCell):
    """LSTM with (diagonal) peephole connections: the gates also see the cell state."""

    def __init__(self, n_in: int, hidden: int):
        super().__init__(n_in, hidden)
        self.peep = nn.Parameter(torch.zeros(3, hidden))  # p_i, p_f, p_o

    def step(self, xp: torch.Tensor, state: LayerState) -> LayerState:
        h, c = state
        i, f, g, o = (xp + h @ self.weight_hh.t()).chunk(4, 1)
        p_i, p_f, p_o = self.peep
        i = torch.sigmoid(i + p_i * c)  # i_t = sigma(W_i [h_{t-1}, x_t] + p_i * C_{t-1} + b_i)
        f = torch.sigmoid(f + p_f * c)  # f_t = sigma(W_f [h_{t-1}, x_t] + p_f * C_{t-1} + b_f)
        c = f * c + i * torch.tanh(g)  # C_t = f_t * C_{t-1} + i_t * C~_t
        o = torch.sigmoid(o + p_o * c)  # o_t = sigma(W_o [h_{t-1}, x_t] + p_o * C_t + b_o)
        return o * torch.tanh(c), c  # h_t = o_t * tanh(C_t)


class CoupledLSTM(CustomCell):
    """LSTM whose input gate is 1 - forget gate: what is forgotten is what gets written."""

    n_gates = 3

    def step(self, xp: torch.Tensor, state: LayerState) -> LayerState:
        h, c = state
        f, g, o = (xp + h @ self.weight_hh.t()).chunk(3, 1)
        f = torch.sigmoid(f)  # f_t = sigma(W_f [h_{t-1}, x_t] + b_f)
        c = f * c + (1 - f) * torch.tanh(g)  # C_t = f_t * C_{t-1} + (1 - f_t) * C~_t
        return torch.sigmoid(o) * torch.tanh(c), c  # h_t = o_t * tanh(C_t)


class MultiplicativeLSTM(CustomCell):
    """mLSTM (Krause et al. 2016; Radford et al. 2017): the gates see m_t = (W_mx x_t) * (W_mh h_{t-1})."""

    def __init__(self, n_in: int, hidden: int):
        super().__init__(n_in, hidden)
        self.weight_mx = nn.Parameter(torch.empty(hidden, n_in))  # W_mx
        self.weight_mh = nn.Parameter(torch.empty(hidden, hidden))  # W_mh
        self.reset_parameters()  # weight_hh (4H, H) multiplies m_t here, not h_{t-1}

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        # [W_mx x_t | W_x x_t + b] in one matmul; m has no bias, so its share of the bias is 0
        bias = torch.cat([self.bias.new_zeros(self.hidden), self.bias])
        return F.linear(x, torch.cat([self.weight_mx, self.weight_ih]), bias)  # (..., 5H)

    def step(self, xp: torch.Tensor, state: LayerState) -> LayerState:
        h, c = state
        mx, gx = xp.split([self.hidden, 4 * self.hidden], 1)
        m = mx * (h @ self.weight_mh.t())  # m_t = (W_mx x_t) * (W_mh h_{t-1})
        i, f, g, o = (gx + m @ self.weight_hh.t()).chunk(4, 1)  # gates from x_t and m_t
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # C_t = f_t * C_{t-1} + i_t * C~_t
        return torch.sigmoid(o) * torch.tanh(c), c  # h_t = o_t * tanh(C_t)

    def sequence(self, xp: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """All T steps at once, the same maths as `step` in a loop: the input projections xp (T, B, 5H),
        time-major so that each step's slice is contiguous -> outputs (B, T, H), final (h, c)."""
        out, h, c = MLSTMSequence.apply(xp, state[0], state[1], self.weight_mh, self.weight_hh)
        # batch-major and contiguous, as `recur` returns it: dropout draws its mask in memory order
        return out.transpose(0, 1).contiguous(), (h, c)


class MLSTMSequence(torch.autograd.Function):
    """A whole mLSTM layer over T steps with a hand-written backward: the same maths as
    `MultiplicativeLSTM.step` in a loop, at a fraction of autograd's per-step cost.

    Forward: two matmuls and eight elementwise ops per step, written into preallocated (T, B, .)
    buffers. Backward: the derivatives that do not depend on the recurrence are computed for all
    steps at once, the loop over time does two matmuls and six elementwise ops per step, and the
    recurrent weights' gradients are one matmul each over the stacked steps. The matmuls go through
    `_times_t` (oneDNN's linear in fp32 on a CPU: about twice torch.mm's speed at these shapes).
    Inputs are time-major: xp (T, B, 5H) = [W_mx x_t | W_x x_t + b], h0 and c0 (B, H).
    """

    @staticmethod
    def forward(ctx, xp, h0, c0, w_mh, w_hh):
        T, B, H = xp.shape[0], xp.shape[1], h0.shape[1]
        mx, gx = xp[..., :H], xp[..., H:]  # (T, B, H), (T, B, 4H)
        hs = xp.new_empty(T + 1, B, H)  # h_{t-1} for t = 0..T: hs[0] = h0, hs[1:] the outputs
        cs = xp.new_empty(T + 1, B, H)  # C_{t-1} likewise
        a = xp.new_empty(T, B, H)  # W_mh h_{t-1}
        m = xp.new_empty(T, B, H)  # m_t
        gates = xp.new_empty(T, B, 4 * H)  # sigma(i), sigma(f), tanh(g), sigma(o)
        tc = xp.new_empty(T, B, H)  # tanh(C_t)
        z = xp.new_empty(B, 4 * H)  # one step's gate pre-activations
        hs[0], cs[0] = h0, c0
        for t in range(T):
            a[t] = _times_t(hs[t], w_mh)
            torch.mul(mx[t], a[t], out=m[t])  # m_t = (W_mx x_t) * (W_mh h_{t-1})
            torch.add(gx[t], _times_t(m[t], w_hh), out=z)  # gates from x_t and m_t
            g = gates[t]
            torch.sigmoid(z, out=g)
            torch.tanh(z[:, 2 * H:3 * H], out=g[:, 2 * H:3 * H])
            torch.mul(g[:, H:2 * H], cs[t], out=cs[t + 1])  # C_t = f_t * C_{t-1} + i_t * C~_t
            cs[t + 1].addcmul_(g[:, :H], g[:, 2 * H:3 * H])
            torch.tanh(cs[t + 1], out=tc[t])
            torch.mul(g[:, 3 * H:], tc[t], out=hs[t + 1])  # h_t = o_t * tanh(C_t)
        ctx.save_for_backward(xp, w_mh, w_hh, hs, cs, a, m, gates, tc)
        return hs[1:], hs[T].clone(), cs[T].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):
        xp, w_mh, w_hh, hs, cs, a, m, gates, tc = ctx.saved_tensors
        T, B, H = a.shape
        mx = xp[..., :H]
        i, f, g, o = gates.view(T, B, 4, H).unbind(2)
        # the parts of dL/dz that do not depend on the recurrence, for every step at once
        k_c = o * (1 - tc * tc)  # dC_t/dh_t's share: dC += dh * o (1 - tanh^2 C)
        k_o = tc * o * (1 - o)  # dz_o = dh * tanh(C) o (1 - o)
        k_ifg = torch.stack([g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)], 2)  # (T, B, 3, H)
        dxp = xp.new_empty(T, B, 5 * H)
        dz = dxp[..., H:].view(T, B, 4, H)  # dL/d(gate pre-activations) = dL/d(W_x x_t + b)
        dm = xp.new_empty(T, B, H)
        da = xp.new_empty(T, B, H)
        dh = d_out[T - 1] if d_out is not None else xp.new_zeros(B, H)
        if d_hT is not None:
            dh = dh + d_hT
        dc_f = d_cT if d_cT is not None else xp.new_zeros(B, H)  # dL/dC_t through C_{t+1} = f C_t + ...
        w_mh_t, w_hh_t = w_mh.t().contiguous(), w_hh.t().contiguous()  # x @ W is x @ (W^T)^T
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dh = _times_t(da[t + 1], w_mh_t)
                if d_out is not None:
                    dh += d_out[t]
            dc = torch.addcmul(dc_f, dh, k_c[t])
            torch.mul(dc.unsqueeze(1), k_ifg[t], out=dz[t, :, :3])
            torch.mul(dh, k_o[t], out=dz[t, :, 3])
            dc_f = dc * f[t]
            dm[t] = _times_t(dz[t].view(B, 4 * H), w_hh_t)
            torch.mul(dm[t], mx[t], out=da[t])  # dL/d(W_mh h_{t-1})
        dh0 = _times_t(da[0], w_mh_t)
        torch.mul(dm, a, out=dxp[..., :H])  # dL/d(W_mx x_t)
        # sums over t of dz_t^T m_t and da_t^T h_{t-1}, in one matmul each
        d_w_hh = _times_t(dz.permute(2, 3, 0, 1).reshape(4 * H, T * B), m.view(T * B, H).t().contiguous())
        d_w_mh = _times_t(da.view(T * B, H).t().contiguous(), hs[:-1].reshape(T * B, H).t().contiguous())
        return dxp, dh0, dc_f, d_w_mh, d_w_hh


@functools.cache
def _onednn_linear() -> Callable | None:
    """oneDNN's linear (x @ w.t()) where this build of PyTorch has it and it works here, else None; tried once."""
    try:
        if torch.backends.mkldnn.is_available():
            op = torch.ops.mkldnn._linear_pointwise.default
            x, w = torch.ones(2, 3), torch.ones(4, 3)
            if torch.equal(op(x, w, None, "none", [], ""), x @ w.t()):
                return op
    except (AttributeError, RuntimeError):
        pass
    return None


def _times_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.t() for the mLSTM's products: through oneDNN's linear on a CPU for fp32, where it ran about
    twice as fast as torch.mm for the per-step (B, H) products and 1.2x for the weights' gradients over all
    steps (docs/cells.md); torch.mm otherwise."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        op = _onednn_linear()
        if op is not None:
            return op(x, w, None, "none", [], "")
    return x @ w.t()


CUSTOM = {"peephole": PeepholeLSTM, "coupled": CoupledLSTM, "mlstm": MultiplicativeLSTM}


class FusedLayer:
    """One layer of an nn.LSTM/GRU/RNN run step by step, with the same math as the fused kernel.

    A plain object (not a Module) so that the fused module's parameter names stay as they are.
    """

    def __init__(self, rnn: nn.Module, layer: int, cell: str):
        self.cell = cell
        self.w_ih = getattr(rnn, f"weight_ih_l{layer}")
        self.w_hh = getattr(rnn, f"weight_hh_l{layer}")
        self.b_ih = getattr(rnn, f"bias_ih_l{layer}")
        self.b_hh = getattr(rnn, f"bias_hh_l{layer}")

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        if self.cell == "gru":  # the candidate's recurrent bias sits inside r_t * (...): keep it apart
            return F.linear(x, self.w_ih, self.b_ih)
        return F.linear(x, self.w_ih, self.b_ih + self.b_hh)

    def step(self, xp: torch.Tensor, state: LayerState) -> LayerState:
        h = state[0]
        if self.cell == "lstm":
            i, f, g, o = (xp + h @ self.w_hh.t()).chunk(4, 1)
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)  # C_t = f_t C_{t-1} + i_t C~_t
            return torch.sigmoid(o) * torch.tanh(c), c  # h_t = o_t tanh(C_t)
        if self.cell == "gru":
            x_r, x_z, x_n = xp.chunk(3, 1)
            h_r, h_z, h_n = F.linear(h, self.w_hh, self.b_hh).chunk(3, 1)
            r = torch.sigmoid(x_r + h_r)  # reset gate
            z = torch.sigmoid(x_z + h_z)  # update gate
            n = torch.tanh(x_n + r * h_n)  # candidate
            return ((1 - z) * n + z * h,)  # h_t = (1 - z_t) n_t + z_t h_{t-1}
        return (torch.tanh(xp + h @ self.w_hh.t()),)  # h_t = tanh(W_xh x_t + W_hh h_{t-1} + b)


def recur(cell, xp: torch.Tensor, state: LayerState, hook: Hook | None = None,
          layer: int = 0) -> tuple[torch.Tensor, LayerState]:
    """The one recurrence loop: xp (B, T, G) precomputed input projections -> outputs (B, T, H), final state."""
    outs = []
    # unbind once: indexing xp[:, t] in the loop would make backward add T full-size zero tensors
    for t, xp_t in enumerate(xp.unbind(1)):
        state = cell.step(xp_t, state)
        if hook is not None:
            state = hook(layer, t, state)
        outs.append(state[0])
    return torch.stack(outs, 1), state


def _whole_sequence(cell, idx: torch.Tensor, hook: Hook | None, layer: int) -> bool:
    """Whether this layer runs as one `cell.sequence` call instead of `recur`: the cell has one
    (mlstm), no hook reaches this layer (a hook's `first_layer` leaves the layers below alone), and
    no autocast is on (the hand-written backward works in the tensors' own dtype)."""
    if not hasattr(cell, "sequence") or idx.shape[1] == 0:
        return False
    if hook is not None and layer >= getattr(hook, "first_layer", 0):
        return False
    return not torch.is_autocast_enabled(idx.device.type)


def _step_from_rows(rows: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, cell: str,
                    c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer of a sampling step of a fused LSTM or RNN from its input projections with both biases
    added, (B, G), which it overwrites: layer 0's rows of the folded table, or an upper layer's
    `torch.addmm(bias, x, w_ih.t())`. The same maths as torch.lstm_cell / rnn_tanh_cell, with the
    recurrent matmul accumulated into the rows in place. Returns (h, C), C None for the RNN.
    For the layers above 0 this ran 4-5% faster a step than torch.lstm_cell (2x512 LSTM, one stream in
    fp32 and bf16, 64 streams in bf16, on a 2-core EPYC): one bias copy and one sum fewer."""
    return _activate(rows.addmm_(h, w_hh.t()), cell, c)


def _activate(gates: torch.Tensor, cell: str, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, C) of an LSTM (C None for the RNN) from its summed pre-activations (B, G), which it overwrites."""
    if cell == "rnn":
        return gates.tanh_(), None
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f).mul_(c).addcmul_(torch.sigmoid(i), g.tanh_())  # C_t = f_t C_{t-1} + i_t C~_t
    return torch.sigmoid(o).mul_(torch.tanh(c)), c  # h_t = o_t tanh(C_t)


def _gru_update(xp: torch.Tensor, hp: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A GRU layer's new h from its input and recurrent products, each with its bias (B, 3H; both overwritten):
    the same maths as torch.gru_cell and FusedLayer.step."""
    x_r, x_z, x_n = xp.chunk(3, 1)
    h_r, h_z, h_n = hp.chunk(3, 1)
    r = torch.sigmoid(x_r.add_(h_r))  # reset gate
    z = torch.sigmoid(x_z.add_(h_z))  # update gate
    n = torch.tanh(x_n.addcmul_(r, h_n))  # candidate
    return n.add_(z.mul_(h - n))  # h_t = (1 - z_t) n_t + z_t h_{t-1}


def _hooked(hook: Hook, layer: int, h: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sampling step's layer state after `hook(layer, 0, state)`: (h, C), C None for cells without one."""
    fixed = hook(layer, 0, (h, c) if c is not None else (h,))
    return fixed[0], (fixed[1] if c is not None else None)


def weights_key(tensors) -> tuple:
    """What identifies the values of these tensors while they live: each one's storage and version counter
    (bumped by every in-place change: an optimiser step, load_state_dict). Sampling's caches are kept
    under it and made again when it changes."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


# The number of rows oneDNN lays a sampling step's weights out for. In bf16 it made no difference; in fp32 a
# layout for 1 row took 0.79 ms for 64 rows of a (64, 1024) x (1024, 2048) product where one for 8 or 64 took
# 0.57-0.58, and those took 0.058 ms for 1 row, as the layout for 1 did (2-core EPYC).
PACK_ROWS = 64


@functools.cache
def _packed_linear(dtype: torch.dtype) -> tuple[Callable, Callable] | None:
    """(pack(w, rows), linear(x, packed, bias)): oneDNN's linear x @ w.t() + bias on a weight laid out
    ahead for it, where this build of PyTorch has it and it gives x @ w.t() here in `dtype`; else None.
    Tried once per dtype (a CPU without AVX512 may refuse bf16)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        reorder, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise.default
        x = torch.arange(6.0).reshape(2, 3).to(dtype)
        w = torch.arange(12.0).reshape(4, 3).to(dtype)  # small integers: exact in bf16 too
        if not torch.equal(linear(x, reorder(w, 2), None, "none", [], ""), x @ w.t()):
            return None
    except (AttributeError, RuntimeError):
        return None
    return reorder, lambda x, packed, bias: linear(x, packed, bias, "none", [], "")


# ---------------------------------------------------------------- the model


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        if c.cell in CUSTOM:
            sizes = [c.embed_dim] + [c.hidden] * (c.layers - 1)
            self.cells = nn.ModuleList(CUSTOM[c.cell](n_in, c.hidden) for n_in in sizes)
        else:
            rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[c.cell]
            self.rnn = rnn_cls(
                c.embed_dim, c.hidden, c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0
            )
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    # What sampling keeps on the model between calls, each rebuilt when a weight changes: layer 0's folded
    # table, the weights laid out for oneDNN's linear (opaque tensors, which cannot be copied), and
    # sample.with_precision's bf16 copy. A copy of the model starts without them.
    SAMPLING_CACHES = ("_folded", "_packed", "_precision_copy")

    def __getstate__(self) -> dict:
        """What copy.deepcopy (and pickle) take of the model: all but SAMPLING_CACHES."""
        return {k: v for k, v in self.__dict__.items() if k not in self.SAMPLING_CACHES}

    @property
    def n_state(self) -> int:
        return 2 if HAS_CELL_STATE[self.config.cell] else 1

    @property
    def fused(self) -> bool:
        return self.config.cell in FUSED_CELLS

    def layer_cells(self) -> list:
        """Each layer as an object with `in_proj(x)` and `step(xp, state)` (see `recur`)."""
        if self.fused:
            return [FusedLayer(self.rnn, i, self.config.cell) for i in range(self.config.layers)]
        return list(self.cells)

    def init_state(self, batch_size: int, device=None) -> State:
        c = self.config
        w = self.head.weight
        z = torch.zeros(c.layers, batch_size, c.hidden, device=device or w.device, dtype=w.dtype)
        return tuple(z.clone() for _ in range(self.n_state))

    def _run_fused(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.n_state == 2:
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            return out, (h, c)
        out, h = self.rnn(x, state[0])
        return out, (h,)

    def _run_fused_layers(self, x: torch.Tensor, state: State, n: int) -> tuple[torch.Tensor, list[LayerState]]:
        """The bottom n layers of a fused model on the fused kernel; their final states, per layer."""
        c = self.config
        params = []
        for layer in range(n):
            params += [getattr(self.rnn, f"{w}_l{layer}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        drop = c.dropout if n > 1 else 0.0
        args = (params, True, n, drop, self.training, False, True)
        if c.cell == "lstm":
            out, h, cs = torch.lstm(x, (state[0][:n].contiguous(), state[1][:n].contiguous()), *args)
            return out, [(h[i], cs[i]) for i in range(n)]
        fn = torch.gru if c.cell == "gru" else torch.rnn_tanh
        out, h = fn(x, state[0][:n].contiguous(), *args)
        return out, [(h[i],) for i in range(n)]

    def _run_steps(self, idx: torch.Tensor, state: State, hook: Hook | None) -> tuple[torch.Tensor, State]:
        finals = []
        first = min(getattr(hook, "first_layer", 0), self.config.layers) if self.fused else 0
        if first > 0:
            x, finals = self._run_fused_layers(self.embedding(idx), state, first)
        for layer, cell in enumerate(self.layer_cells()):
            if layer < first:
                continue
            layer_state = tuple(s[layer] for s in state)
            whole = _whole_sequence(cell, idx, hook, layer)
            if layer == 0:  # a row per character: the table of every character's input projection
                xp = F.embedding(idx.t() if whole else idx, cell.in_proj(self.embedding.weight))
            else:
                x = self.drop(x)  # between layers, as nn.LSTM's dropout
                xp = cell.in_proj(x.transpose(0, 1) if whole else x)  # every step's projection in one matmul
            if whole:
                x, last = cell.sequence(xp, layer_state)  # xp time-major (T, B, G) -> (B, T, H)
            else:
                x, last = recur(cell, xp, layer_state, hook, layer)  # xp (B, T, G) -> (B, T, H)
            finals.append(last)
        return x, tuple(torch.stack(parts) for parts in zip(*finals))

    def _pinned(self, hook: Hook | None, write: Write | None) -> Hook:
        """`hook` after holding the bound unit's h at its written value (0 without `write`) at every step
        of the top layer; the unit's own value before that goes to `write.read`."""
        top, unit = self.config.layers - 1, self.config.bound_unit
        reads: list[torch.Tensor] = []

        def pinned(layer: int, t: int, state: LayerState) -> LayerState:
            if layer == top:
                if write is not None:
                    reads.append(state[-1][:, unit])  # c, or h without a cell state
                    if len(reads) == write.values.shape[1]:
                        write.read = torch.stack(reads, 1)
                col = write.values[:, t] if write is not None else state[0].new_zeros(state[0].shape[0])
                state = (set_unit(state[0], unit, col),) + tuple(state[1:])
            return hook(layer, t, state) if hook is not None else state

        pinned.first_layer = min(top, getattr(hook, "first_layer", 0)) if hook is not None else top
        return pinned

    def _run_bound_fused(self, x: torch.Tensor, state: State, write: Write | None) -> tuple[torch.Tensor, State]:
        """A bound LSTM, GRU or RNN on the fused kernel: the same numbers as holding the unit's h at the
        written values step by step (`_pinned`). With `write.rows`, the top layer runs a second time for
        those rows with `write.other` written, on the same input from below (`write.other_logits`)."""
        top = self.config.layers - 1
        finals: list[LayerState] = []
        if top > 0:
            x, finals = self._run_fused_layers(x, state, top)
            x = self.drop(x)  # between layers, as nn.LSTM's dropout
        values = write.values if write is not None else x.new_zeros(x.shape[:2])
        top_state = tuple(s[top] for s in state)
        out, last = self._bound_top(x, top_state, values, write)
        finals.append(last)
        if write is not None and write.rows is not None:
            rows = write.rows
            other, _ = self._bound_top(x[rows], tuple(s[rows] for s in top_state), write.other, None)
            write.other_logits = self.head(self.drop(other))
        return out, tuple(torch.stack(parts) for parts in zip(*finals))

    def _top_weights(self) -> tuple[torch.Tensor, ...]:
        top = self.config.layers - 1
        return tuple(getattr(self.rnn, f"{n}_l{top}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def _bound_top(self, x, state: LayerState, values, write: Write | None) -> tuple[torch.Tensor, LayerState]:
        """The bound top layer on the fused kernel. For the LSTM and the RNN a held h_{t-1} reaches the
        gates only through its column of W_hh, added to the rest, so that column moves to an extra input
        channel that carries the values held a step before; the unit's own output is masked out of the
        recurrence and replaced in the output. (The GRU multiplies it by the reset gate: `_bound_top_gru`.)"""
        if self.config.cell == "gru":
            return self._bound_top_gru(x, state[0], values, write)
        unit, lstm = self.config.bound_unit, self.config.cell == "lstm"
        values = values.to(x.dtype)
        w_ih, w_hh, b_ih, b_hh = self._top_weights()
        h0 = state[0]
        keep = torch.ones(w_hh.shape[1], dtype=w_hh.dtype, device=w_hh.device)
        keep[unit] = 0
        w_in = torch.cat([w_ih, w_hh[:, unit:unit + 1]], 1)
        w_rec = w_hh * keep  # the unit's own output reaches no gate: its column is zero
        # step t's gates see h_{t-1}: the value written at the step before (the carried state's at t = 0)
        held = torch.cat([h0[:, unit:unit + 1].to(x.dtype), values[:, :-1]], 1)
        xin = torch.cat([x, held.unsqueeze(-1)], -1)
        args = ([w_in, w_rec, b_ih, b_hh], True, 1, 0.0, self.training, False, True)
        if lstm:
            out, h, cell = torch.lstm(xin, (h0[None].contiguous(), state[1][None].contiguous()), *args)
        else:
            out, h = torch.rnn_tanh(xin, h0[None].contiguous(), *args)
        if write is not None:  # the unit's own value: its cell state, or for the RNN its h (the kernel's)
            write.read = self._unit_cells(xin, out, h0, state[1][:, unit], w_in, w_rec, b_ih + b_hh) if lstm else out[..., unit]
        last = set_unit(h[0], unit, values[:, -1])
        return set_unit(out, unit, values), ((last, cell[0]) if lstm else (last,))

    def _bound_top_gru(self, x, h0, values, write: Write | None) -> tuple[torch.Tensor, LayerState]:
        """The bound top layer of a GRU on the fused kernel. The GRU's candidate reads h_{t-1} as
        r_t * (W_hn h_{t-1} + b_hn), so the held value cannot enter as an input added to the gates.
        Instead the bound unit itself carries it through the kernel: its update gate is shut (bias -100)
        and its candidate is tanh of an input channel holding atanh(value), so its h at step t is the
        value written at step t, what step t + 1's gates read. What the unit reads of the text, its
        own h as the GRU would compute it, comes from its original rows of weights (`_gru_unit_read`)."""
        H, unit = self.config.hidden, self.config.bound_unit
        values = values.to(x.dtype)
        w_ih, w_hh, b_ih, b_hh = self._top_weights()
        ours = torch.zeros(3 * H, dtype=torch.bool, device=w_ih.device)
        ours[[unit, H + unit, 2 * H + unit]] = True  # the unit's r, z and n rows
        channel = torch.zeros(3 * H, w_ih.shape[1] + 1, dtype=w_ih.dtype, device=w_ih.device)
        channel[2 * H + unit, -1] = 1.0  # its candidate reads the channel alone
        shut = torch.zeros(3 * H, dtype=b_ih.dtype, device=b_ih.device)
        shut[H + unit] = -100.0  # its update gate closed: h_t = its candidate
        w_in = torch.where(ours[:, None], channel, F.pad(w_ih, (0, 1)))
        w_rec = torch.where(ours[:, None], 0.0, w_hh)
        b_in, b_rec = torch.where(ours, shut, b_ih), torch.where(ours, 0.0, b_hh)
        edge = 1.0 - torch.finfo(values.dtype).eps  # tanh(atanh(v)) = v for |v| < 1; a GRU's h never reaches 1
        xin = torch.cat([x, values.clamp(-edge, edge).atanh().unsqueeze(-1)], -1)
        out, h = torch.gru(xin, h0[None].contiguous(), [w_in, w_rec, b_in, b_rec], True, 1, 0.0, self.training, False, True)
        if write is not None:
            write.read = self._gru_unit_read(x, out, h0, (w_ih, w_hh, b_ih, b_hh))
        return set_unit(out, unit, values), (set_unit(h[0], unit, values[:, -1]),)

    def _gru_unit_read(self, x, out, h0, weights) -> torch.Tensor:
        """(B, T): the bound unit's own h at every step, (1 - z_t) n_t + z_t v_{t-1}, from its original
        rows of weights and the layer's h_{t-1} (the kernel's outputs, the unit holding its written value)."""
        H, unit = self.config.hidden, self.config.bound_unit
        w_ih, w_hh, b_ih, b_hh = weights
        rows = [unit, H + unit, 2 * H + unit]  # its r, z, n
        h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)  # (B, T, H)
        gi, gh = F.linear(x, w_ih[rows], b_ih[rows]), F.linear(h_prev, w_hh[rows], b_hh[rows])  # (B, T, 3)
        r, z = torch.sigmoid(gi[..., 0] + gh[..., 0]), torch.sigmoid(gi[..., 1] + gh[..., 1])
        n = torch.tanh(gi[..., 2] + r * gh[..., 2])
        return (1 - z) * n + z * h_prev[..., unit]

    def _unit_cells(self, xin, out, h0, c0, w_in, w_rec, bias) -> torch.Tensor:
        """(B, T): the bound unit's cell state at every step, recomputed from the kernel's outputs (the
        kernel returns only the last one); its gates are four rows of the layer's weights (`w_rec` with
        the unit's own column zero, so h_{t-1}'s value there does not count)."""
        H, unit = self.config.hidden, self.config.bound_unit
        rows = [unit, H + unit, 2 * H + unit, 3 * H + unit]  # its i, f, g, o
        h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)  # (B, T, H)
        z = F.linear(xin, w_in[rows]) + F.linear(h_prev, w_rec[rows], bias[rows])  # (B, T, 4)
        i, f, g = torch.sigmoid(z[..., 0]), torch.sigmoid(z[..., 1]), torch.tanh(z[..., 2])
        cells, cell = [], c0
        for t in range(z.shape[1]):
            cell = f[:, t] * cell + i[:, t] * g[:, t]
            cells.append(cell)
        return torch.stack(cells, 1)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: State | None = None,
        hook: Hook | None = None, write: Write | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """idx (B, T) of character ids -> logits (B, T, V), mean loss in nats if targets, new state.

        `hook(layer, t, state) -> state`, if given, runs after every step of every layer (see the
        module docstring); fused cells then run step by step too. `write`: the bound unit's values
        (a model with ModelConfig.bound_unit; without it the unit is held at 0).
        """
        if state is None:
            state = self.init_state(idx.shape[0], idx.device)
        bound = self.config.bound_unit is not None
        if bound and hook is None and self.fused:
            out, state = self._run_bound_fused(self.embedding(idx), state, write)  # the fused kernel, the unit written
        elif self.fused and hook is None and not bound:
            out, state = self._run_fused(self.embedding(idx), state)  # (B, T, H)
        else:
            out, state = self._run_steps(idx, state, self._pinned(hook, write) if bound else hook)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        loss = None
        if targets is not None:
            # in fp32 whatever autocast made the logits: a mean over B*T log-probabilities needs the bits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss, state

    @staticmethod
    def detach_state(state: State) -> State:
        return tuple(s.detach() for s in state)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------ one step at a time (sampling)

    def _folded_input(self) -> tuple[torch.Tensor, torch.Tensor | None, list] | None:
        """For sampling a fused model: (layer 0's table (V, G), the GRU's (V, V) identity or None, each
        layer's biases).

        Row v of the table is layer 0's input projection of character v, W_ih0 E_v, with layer 0's input
        bias added (and its recurrent bias too, except for the GRU, whose recurrent bias sits inside
        r_t * (...)). The LSTM and RNN read a character's row straight from it instead of its embedding
        through W_ih0, and the GRU reads it through a one-hot row (a V-wide matmul in place of an E-wide
        one): one stream is memory-bound, and 512 columns of layer 0's input weights read per step
        become one row. A one-hot row sums to 1, so the folded bias is added exactly once. The
        biases handed on per layer are (b_ih, b_hh) as the single-step kernel takes them: None where
        folded, and for the LSTM and RNN above layer 0 the two summed into one. Each bias the kernel
        adds is a copy of a (B, G) block before its matmul: four per step of a 2-layer LSTM were 13% of
        `--num 64`'s time (docs/speed.md), one is left. Kept until any weight changes (their version
        counters, the head's included, so that `_packed_weights` shares the key); None under autograd, for
        inference tensors, or where the vocabulary is not narrower than the embedding."""
        emb, flat = self.embedding.weight, self.rnn._flat_weights
        w_ih = flat[0]
        if torch.is_grad_enabled() or emb.shape[0] >= emb.shape[1] or emb.is_inference() or w_ih.is_inference():
            return None
        key = (w_ih.dtype,) + weights_key([emb, self.head.weight, *flat])
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            cached = (key,) + self._fold(emb, flat)
            self.__dict__["_folded"] = cached
            self.__dict__.pop("_packed", None)  # laid out from the old weights
        return cached[1], cached[2], cached[3]

    def _fold(self, emb: torch.Tensor, flat: list) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """What `_folded_input` keeps: the table, the identity the GRU's one-hot rows come from (None for
        the LSTM and RNN, which gather rows), and each layer's (b_ih, b_hh)."""
        apart = self.config.cell == "gru"  # the GRU's recurrent bias cannot join the input's
        w_ih, b_ih, b_hh = flat[0].float(), flat[2].float(), flat[3].float()
        bias0 = b_ih if apart else b_ih + b_hh
        table = (emb.float() @ w_ih.t() + bias0).to(flat[0].dtype).contiguous()  # (V, G): a row per character
        biases = [(None, flat[3] if apart else None)]
        for layer in range(1, self.config.layers):
            b_ih, b_hh = flat[4 * layer + 2], flat[4 * layer + 3]
            biases.append((b_ih, b_hh) if apart else ((b_ih.float() + b_hh.float()).to(b_ih.dtype), None))
        eye = torch.eye(emb.shape[0], dtype=flat[0].dtype, device=flat[0].device) if apart else None
        return table, eye, biases

    def step(self, idx: torch.Tensor, state: State, hook: Hook | None = None) -> tuple[torch.Tensor, State]:
        """One character per sequence: idx (B,) -> logits (B, V), new state. Eval-mode math.

        Fused cells step layer by layer, not through nn.LSTM/GRU/RNN: on CPU a one-step call of the fused
        module re-lays its weights every time and is several times slower. Without autograd they step
        through oneDNN's linear on weights laid out once where PyTorch has it (`_packed_weights`), else the
        LSTM and RNN through one addmm per layer (layer 0 from the folded table) and the GRU through
        torch.gru_cell. `hook(layer, 0, state)`, if given, edits each layer's new state before the layer
        above (and the head) reads it.
        """
        c = self.config
        folded = self._folded_input() if self.fused else None
        if c.bound_unit is not None:  # held at 0 before the hook, which may write it
            hook = self._pinned(hook, None)
        packed = self._packed_weights() if folded is not None else None
        if packed is not None:
            return self._packed_step(idx, state, hook, folded, packed)
        if folded is None:
            x = self.embedding(idx)  # (B, E)
        else:  # the GRU's one-hot rows (B, V); the LSTM and RNN gather layer 0's rows below instead
            x = folded[1][idx] if folded[1] is not None else None
        if not self.fused:
            finals = []
            for layer, cell in enumerate(self.cells):
                finals.append(cell.step(cell.in_proj(x), tuple(s[layer] for s in state)))
                if hook is not None:
                    finals[-1] = hook(layer, 0, finals[-1])
                x = finals[-1][0]
            return self.head(x), tuple(torch.stack(parts) for parts in zip(*finals))
        hs, cs = [], []
        weights = self.rnn._flat_weights  # w_ih, w_hh, b_ih, b_hh per layer, kept current by nn.RNNBase
        for layer in range(c.layers):
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer:4 * layer + 4]
            if folded is not None:
                b_ih, b_hh = folded[2][layer]  # folded into the table, or summed into one
                if layer == 0 and c.cell == "gru":
                    w_ih = folded[0].t()  # the embedding and input bias folded in: one-hot rows read it
            h = state[0][layer]
            if folded is not None and c.cell != "gru":
                rows = folded[0].index_select(0, idx) if layer == 0 else torch.addmm(b_ih, x, w_ih.t())
                h, cell = _step_from_rows(rows, h, w_hh, c.cell, state[1][layer] if c.cell == "lstm" else None)
                if cell is not None:
                    cs.append(cell)
            elif c.cell == "lstm":
                h, cell = torch.lstm_cell(x, (h, state[1][layer]), w_ih, w_hh, b_ih, b_hh)
                cs.append(cell)
            elif c.cell == "gru":
                h = torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
            else:
                h = torch.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh)
            if hook is not None:
                h, cell = _hooked(hook, layer, h, cs[-1] if c.cell == "lstm" else None)
                if c.cell == "lstm":
                    cs[-1] = cell
            hs.append(h)
            x = h
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if cs else ())
        return self.head(x), new_state

    def _packed_weights(self) -> tuple[list, Callable] | None:
        """For sampling a fused cell on a CPU through oneDNN's linear (`_packed_linear`): per layer, its
        weights laid out ahead for it, then the head's; and the linear. Layer 0: (W_hh,) (its input is
        the folded table's row). An upper LSTM or RNN layer: ([W_ih W_hh],), side by side, so that one
        product of [x h] with the summed bias replaces two. An upper GRU layer: (W_ih, W_hh), apart,
        since its candidate reads r_t * (W_hn h + b_hn). None where that linear is missing. Kept until
        any weight changes, whatever the number of streams (the server's batch changes size from step
        to step): laid out for PACK_ROWS. Called after `_folded_input`, which drops it when a weight changes.

        On a 2-core AVX512-BF16 EPYC, 2x512, against the paths below it (a step, median of 7): the LSTM's
        one stream fp32 0.230 -> 0.167 ms, bf16 0.221 -> 0.122; 64 streams bf16 0.80 -> 0.70, fp32
        3.44 -> 1.44; the GRU's one stream fp32 0.215 -> 0.197, bf16 0.235 -> 0.139; 64 streams bf16
        0.832 -> 0.679, fp32 2.44 -> 1.10. The same logits to 1e-5 in fp32. Laying out takes a few ms."""
        if "_packed" not in self.__dict__:
            self.__dict__["_packed"] = self._lay_out()
        return self.__dict__["_packed"]

    def _lay_out(self) -> tuple[list, Callable] | None:
        """What `_packed_weights` keeps, made from the weights as they are now (None without the linear)."""
        w = self.head.weight
        ops = _packed_linear(w.dtype) if w.device.type == "cpu" else None
        if ops is None:
            return None
        flat = self.rnn._flat_weights
        pack = lambda t: ops[0](t, PACK_ROWS)  # noqa: E731
        layers = [(pack(flat[1]),)]
        for layer in range(1, self.config.layers):
            w_ih, w_hh = flat[4 * layer], flat[4 * layer + 1]
            layers.append((pack(w_ih), pack(w_hh)) if self.config.cell == "gru"
                          else (pack(torch.cat([w_ih, w_hh], 1)),))
        return layers + [pack(w)], ops[1]

    def _packed_step(self, idx: torch.Tensor, state: State, hook: Hook | None, folded: tuple,
                     packed: tuple) -> tuple[torch.Tensor, State]:
        """`step` of a fused cell through the weights `_packed_weights` laid out, and its linear."""
        (weights, linear), (table, _, biases) = packed, folded
        cell_name = self.config.cell
        lstm = cell_name == "lstm"
        hs, cs, x = [], [], None
        for layer in range(self.config.layers):
            h, w, (b_in, b_rec) = state[0][layer], weights[layer], biases[layer]
            if cell_name == "gru":  # input and recurrent products apart: r_t reaches into the second
                xp = table.index_select(0, idx) if layer == 0 else linear(x, w[0], b_in)
                h, cell = _gru_update(xp, linear(h, w[-1], b_rec), h), None
            else:
                if layer == 0:  # the character's row of the folded table, plus the recurrent product
                    gates = table.index_select(0, idx).add_(linear(h, w[0], None))
                else:  # [x h] through [W_ih W_hh], with the layer's summed bias
                    gates = linear(torch.cat([x, h], 1), w[0], b_in)
                h, cell = _activate(gates, cell_name, state[1][layer] if lstm else None)
            if hook is not None:
                h, cell = _hooked(hook, layer, h, cell)
            hs.append(h)
            if lstm:
                cs.append(cell)
            x = h
        return linear(x, weights[-1], self.head.bias), (torch.stack(hs),) + ((torch.stack(cs),) if lstm else ())
