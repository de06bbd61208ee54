"""Putting a run together, new (from a corpus, maybe an --init-from checkpoint) or resumed (from its
newest checkpoint), through one shared assembly; and `payload`, the checkpoint that a resume reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from charrnn import checkpoint as ckpt_mod
from charrnn.config import TrainConfig, resolve, time_budget, validate
from charrnn.data import StreamBatcher, Vocab, load_corpus, split
from charrnn.device import Precision, pick_device, setup_distributed
from charrnn.distributed import Dist, broadcast_object
from charrnn.errors import CheckpointError, UsageError
from charrnn.model import CharRNN, ModelConfig
from charrnn.objective import LanguageModelObjective, Objective
from charrnn.runfolder import RunFolder, default_run_dir, newest_checkpoint, refuse_existing_run
from charrnn.runstate import RunState


@dataclass
class Parts:
    """Everything a Trainer trains with, placed on its device and restored to where the run stands."""

    cfg: TrainConfig
    corpus: list[Path]
    vocab: Vocab
    train_data: torch.Tensor  # (N,) character ids
    val_data: torch.Tensor
    state: RunState
    folder: RunFolder
    device: torch.device
    dist: Dist
    model: CharRNN
    optimizer: torch.optim.Optimizer
    precision: Precision
    rows: slice  # this process's streams of the batch
    carry: tuple  # the recurrent state carried into the next step, for this process's streams
    objective: Objective  # what each step minimises (charrnn/objective.py)
    evaluated: bool  # the current step is already evaluated and saved (a resume from an evaluated checkpoint)


def new_run(corpus: list[Path], cfg: TrainConfig, run_dir: Path | None, init_from: Path | None,
            home: Path) -> Parts:
    validate(cfg)
    corpus = [Path(p) for p in corpus]
    if run_dir is not None:
        refuse_existing_run(Path(run_dir))
    init = ckpt_mod.load(ckpt_mod.resolve(Path(init_from))) if init_from is not None else None
    train_data, val_data, vocab = _load_new_corpus(corpus, cfg, init_from, init)
    cfg = resolve(cfg, len(train_data), time_budget(cfg), pick_device(cfg.device).type,
                  arch=init["model_config"] if init is not None else None)
    state = RunState.start(cfg, StreamBatcher(train_data, cfg.batch_size, cfg.seq_len).batches_per_epoch)
    model_config = ModelConfig(len(vocab), cfg.cell, cfg.layers, cfg.hidden, cfg.embed, cfg.dropout)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(Path(home), corpus, cfg)
    return _assemble(cfg, corpus, vocab, train_data, val_data, state, run_dir, model_config,
                     weights=init["model"] if init is not None else None,
                     record=init.get("sentiment") if init is not None else None)


def _load_new_corpus(corpus: list[Path], cfg: TrainConfig, init_from: Path | None, init: dict | None):
    """(train, validation, vocab); fine-tuning reads the corpus with the checkpoint's vocabulary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        data, vocab = load_corpus(corpus, vocab=Vocab(init["vocab"]) if init else None, errors=cfg.encoding_errors)
    except Exception as e:
        if init is not None and "vocabulary lacks" in str(e):
            raise CheckpointError(
                f"--init-from {init_from}: {e}".replace("; train a new model on it instead", "")
                + "; fine-tuning needs the same characters, so train a new model instead"
            ) from None
        raise
    train_data, val_data = split(data, cfg.val_frac)
    if len(val_data) < 2:
        raise UsageError(f"--val-frac {cfg.val_frac} holds out fewer than 2 characters of this corpus; raise it")
    return train_data, val_data, vocab


def resumed_run(run_dir: Path, threads: int | None = None, device: str | None = None) -> Parts:
    run_dir = Path(run_dir)
    ck = newest_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(ck["train"]["config"])
    cfg = replace(cfg, threads=threads or cfg.threads, device=device or cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = [Path(p) for p in ck["train"]["corpus"]]
    for p in corpus:
        if not p.exists():
            raise CheckpointError(f"cannot resume: the run's corpus file {p} is gone (put it back at that path)")
    vocab = Vocab(ck["vocab"])
    data, _ = load_corpus(corpus, vocab=vocab, errors=cfg.encoding_errors)
    train_data, val_data = split(data, cfg.val_frac)
    state = RunState.from_checkpoint(ck["train"]["state"], cfg)
    return _assemble(cfg, corpus, vocab, train_data, val_data, state, run_dir, ModelConfig(**ck["model_config"]),
                     weights=ck["model"], record=ck.get("sentiment"), saved=ck)


def _assemble(cfg: TrainConfig, corpus: list[Path], vocab: Vocab, train_data: torch.Tensor,
              val_data: torch.Tensor, state: RunState, run_dir: Path, model_config: ModelConfig,
              weights: dict | None, record: dict | None, saved: dict | None = None) -> Parts:
    """The shared assembly: device and process group, model, optimiser, objective, carried state and folder.

    `record` is the unit record of the checkpoint the run starts from (see _objective). `saved` is
    the checkpoint a resumed run continues: its optimiser, carried state and random state are
    restored, so the run goes on exactly as if it had never stopped.
    """
    device, dist = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the initial weights of a new run (a resumed one loads its own)
    model = CharRNN(model_config).to(device)
    if weights is not None:
        model.load_state_dict(weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    precision = Precision(device)
    rows = dist.shard(cfg.batch_size)
    folder = RunFolder(Path(broadcast_object(dist, str(run_dir))), main=dist.main)  # every process, one folder
    if saved is None:
        carry = model.init_state(rows.stop - rows.start, device)
        folder.create()
    else:
        optimizer.load_state_dict(saved["optimizer"])
        precision.load_state_dict(saved.get("scaler"))  # fp16: the loss scale it had reached
        # the carried state of all B streams; this process takes its rows (the process count may differ)
        carry = tuple(s[:, rows].contiguous().to(device) for s in saved["train"]["carry"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        folder.truncate_metrics(state.step)
    objective = _objective(cfg, model, corpus, vocab, train_data, len(train_data) + len(val_data), record)
    return Parts(cfg, corpus, vocab, train_data, val_data, state, folder, device, dist, model, optimizer, precision,
                 rows, carry, objective, evaluated=saved is not None and saved.get("val_loss") is not None)


def _objective(cfg: TrainConfig, model: CharRNN, corpus: list[Path], vocab: Vocab, train_data: torch.Tensor,
               total_chars: int, record: dict | None) -> Objective:
    """Bound when the run asks for it (SentimentConfig.unit), else the plain one. `record` is carried
    into this run's checkpoints, or continued by the binding."""
    from charrnn.neuron.steer import upgrade_record

    record = upgrade_record(record) or None
    if not cfg.sentiment.unit:
        return LanguageModelObjective(record)
    from charrnn.neuron.bind import BoundObjective

    return BoundObjective(model, cfg, corpus, train_data, total_chars, vocab.stoi.get("\n"), record)


def payload(t, val_loss: float | None, carry: tuple) -> dict:
    """The checkpoint of a run `t` (a Trainer) at its current step; `carry` holds all B streams."""
    rng = {"torch": torch.get_rng_state()}
    record = t.objective.record()  # the unit record: bound here, or carried from the checkpoint
    if t.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model_config": t.model.config.to_dict(),
        "vocab": t.vocab.chars,
        "model": {k: v.detach().cpu() for k, v in t.model.state_dict().items()},
        "optimizer": t.optimizer.state_dict(),
        "rng": rng,
        "val_loss": val_loss,
        "train": {
            "config": t.cfg.to_dict(),
            "corpus": [str(p.resolve()) for p in t.corpus],
            "state": dict(t.state.__dict__),
            "step": t.state.step,
            "carry": tuple(s.detach().cpu() for s in carry),
        },
        **({"sentiment": record} if record else {}),
        **({"scaler": t.precision.state_dict()} if t.precision.scaler is not None else {}),
    }
