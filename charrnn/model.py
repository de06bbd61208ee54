"""The character-level recurrent language model: embedding, a stack of recurrent layers, a linear head.

Every cell's state is a tuple of tensors of shape (layers, B, H): (h, c) for LSTM-like cells, (h,)
for GRU and RNN. Callers never look inside it; they pass back what they got.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSED_CELLS = ("lstm", "gru", "rnn")
CELLS = FUSED_CELLS
HAS_CELL_STATE = {"lstm": True, "gru": False, "rnn": False}

State = tuple[torch.Tensor, ...]


@dataclass
class ModelConfig:
    vocab_size: int = 65  # number of distinct characters
    cell: str = "lstm"  # one of CELLS
    layers: int = 2  # stacked recurrent layers
    hidden: int = 512  # units per recurrent layer
    embed: int = 0  # embedding width; 0 means the same as hidden
    dropout: float = 0.0  # between layers and before the head, during training only

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def embed_dim(self) -> int:
        return self.embed or self.hidden


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[c.cell]
        self.rnn = rnn_cls(
            c.embed_dim, c.hidden, c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0
        )
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    @property
    def n_state(self) -> int:
        return 2 if HAS_CELL_STATE[self.config.cell] else 1

    def init_state(self, batch_size: int, device=None) -> State:
        c = self.config
        z = torch.zeros(c.layers, batch_size, c.hidden, device=device or self.head.weight.device)
        return tuple(z.clone() for _ in range(self.n_state))

    def _run(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.n_state == 2:
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            return out, (h, c)
        out, h = self.rnn(x, state[0])
        return out, (h,)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: State | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """idx (B, T) of character ids -> logits (B, T, V), mean loss in nats if targets, new state."""
        if state is None:
            state = self.init_state(idx.shape[0], idx.device)
        x = self.embedding(idx)  # (B, T, E)
        out, state = self._run(x, state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, state

    @staticmethod
    def detach_state(state: State) -> State:
        return tuple(s.detach() for s in state)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------ one step at a time (sampling)

    def step(self, idx: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One character per sequence: idx (B,) -> logits (B, V), new state. Eval-mode math.

        Uses the single-step cell kernels directly; on CPU a one-step call of the fused
        nn.LSTM re-lays its weights every time and is several times slower.
        """
        c = self.config
        x = self.embedding(idx)  # (B, E)
        hs, cs = [], []
        for layer in range(c.layers):
            w_ih = getattr(self.rnn, f"weight_ih_l{layer}")
            w_hh = getattr(self.rnn, f"weight_hh_l{layer}")
            b_ih = getattr(self.rnn, f"bias_ih_l{layer}")
            b_hh = getattr(self.rnn, f"bias_hh_l{layer}")
            h = state[0][layer]
            if c.cell == "lstm":
                h, cell = torch.lstm_cell(x, (h, state[1][layer]), w_ih, w_hh, b_ih, b_hh)
                cs.append(cell)
            elif c.cell == "gru":
                h = torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
            else:
                h = torch.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh)
            hs.append(h)
            x = h
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if cs else ())
        return self.head(x), new_state
