"""Putting a run together, new (from a corpus, maybe an --init-from checkpoint) or resumed (from its
newest checkpoint), through one shared assembly; and `payload`, the checkpoint that a resume reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from charrnn import checkpoint as ckpt_mod
from charrnn.config import TrainConfig, resolve, time_budget, validate
from charrnn.data import StreamBatcher, Vocab, encode, iter_corpus_text, join_encoded, split
from charrnn.device import Precision, pick_device, setup_distributed
from charrnn.distributed import Dist, broadcast_object
from charrnn.errors import CheckpointError, UsageError
from charrnn.events import SizingEvent, TrainEvents, WarnEvent
from charrnn.model import CharRNN, ModelConfig
from charrnn.objective import LanguageModelObjective, Objective
from charrnn.precision import Choice, check_available, choose, for_resume
from charrnn.runfolder import RunFolder, default_run_dir, newest_checkpoint, refuse_existing_run
from charrnn.runlock import check_free
from charrnn.lexicon import Lexicon
from charrnn.runstate import RunState
from charrnn.sizing import Sizer


@dataclass
class Start:
    """What a run starts from, read from its sources (corpus, config, a checkpoint) before any device."""

    cfg: TrainConfig  # resolved
    corpus: list[Path]
    corpus_sha256: list[str]  # the corpus files' fingerprints, kept in checkpoints (resume refuses a changed corpus)
    vocab: Vocab
    train_data: torch.Tensor  # (N,) character ids
    val_data: torch.Tensor
    state: RunState
    model_config: ModelConfig
    weights: dict | None = None  # initial weights: --init-from's, or the resumed checkpoint's
    source: str | None = None  # the checkpoint file they come from (named in errors)
    record: dict | None = None  # the unit record of the checkpoint the run starts from (see _objective)
    saved: dict | None = None  # the checkpoint a resumed run continues
    precision_asked: str | None = None  # --precision given with --resume (None: the run's own)
    lexicon: Lexicon | None = None  # the words of the corpus, kept in checkpoints for `sample --words known`


@dataclass
class Parts(Start):
    """Everything a Trainer trains with, placed on its device and restored to where the run stands."""

    folder: RunFolder | None = None
    device: torch.device | None = None
    dist: Dist | None = None
    model: CharRNN | None = None
    net: torch.nn.Module | None = None  # the model, wrapped for DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer | None = None
    precision: Precision | None = None
    precision_choice: Choice | None = None  # the precision's name and why it was chosen (for StartEvent)
    rows: slice | None = None  # this process's streams of the batch
    carry: tuple = ()  # the recurrent state carried into the next step, for this process's streams
    objective: Objective | None = None  # what each step minimises (charrnn/objective.py)
    evaluated: bool = False  # the current step is already evaluated and saved (a resume from an evaluated checkpoint)


def new_run(corpus: list[Path], cfg: TrainConfig, run_dir: Path | None, init_from: Path | None, home: Path,
            events: TrainEvents) -> Parts:
    validate(cfg)
    corpus = [Path(p) for p in corpus]
    if run_dir is not None:
        check_free(run_dir)  # a live run there: say so before reading the corpus
        refuse_existing_run(Path(run_dir))
    init = None
    if init_from is not None:
        init_path, init = ckpt_mod.open_checkpoint(Path(init_from), home, on_warn=lambda m: events.on_warn(WarnEvent(m)))
        ckpt_mod.check_payload(init, init_path)
        init["path"] = str(init_path)
    train_data, val_data, vocab, sha = _load_new_corpus(corpus, cfg, init_from, init)
    asked = pick_device(cfg.device)  # under torchrun each process takes a device of this type
    # a --precision that cannot run: refused before any measuring and before the run folder is made
    check_available(cfg.precision, asked)
    sizer = _sizer(cfg, len(vocab), len(train_data), init, asked.type)
    cfg = resolve(cfg, len(train_data), time_budget(cfg), asked.type,
                  arch=init["model_config"] if init is not None else None, measure=sizer)
    state = RunState.start(cfg, StreamBatcher(train_data, cfg.batch_size, cfg.seq_len).batches_per_epoch)
    if sizer is not None and sizer.speeds:
        state.sizing = sizer.record(cfg.hidden)
        events.on_sizing(_sizing_event(cfg, state.sizing))
    start = Start(cfg, corpus, sha, vocab, train_data, val_data, state,
                  ModelConfig(len(vocab), cfg.cell, cfg.layers, cfg.hidden, cfg.embed, cfg.dropout,
                              _bound_unit(cfg, init)),
                  weights=init["model"] if init is not None else None, source=init["path"] if init is not None else None,
                  record=init.get("sentiment") if init is not None else None,
                  lexicon=_count_words(corpus, cfg).merged(Lexicon.from_record((init or {}).get("lexicon"))))
    device, dist = setup_distributed(cfg)
    folder = RunFolder.claim_new(run_dir, lambda: default_run_dir(Path(home), corpus, cfg), dist)
    with folder.released_on_error(remove=run_dir is None):  # nobody else knows a new default folder
        return _assemble(start, folder, device, dist, events)


def _count_words(corpus: list[Path], cfg: TrainConfig) -> Lexicon:
    """The lexicon of the corpus files (charrnn/lexicon.py)."""
    return Lexicon.count(text for p in corpus for text in iter_corpus_text(Path(p), cfg.encoding_errors))


def _bound_unit(cfg: TrainConfig, init: dict | None) -> int | None:
    """The model's bound unit: the binding's for a bound run, else the --init-from model's own (a bound
    model fine-tuned without binding still holds its unit)."""
    if cfg.sentiment.unit:
        from charrnn.neuron.bind import BOUND_UNIT

        return BOUND_UNIT
    return (init or {}).get("model_config", {}).get("bound_unit")


def _sizer(cfg: TrainConfig, vocab_size: int, train_chars: int, init: dict | None, device_type: str) -> Sizer | None:
    """The measurement of this machine's speed that sizes a new CPU run with a time budget (charrnn/sizing.py);
    None where the width is not the run's to choose by speed (--init-from's, a GPU's table) or where the
    processes of a torchrun job could measure differently (the reference CPU's speeds choose for all of them)."""
    budget = time_budget(cfg)
    if budget is None or init is not None or device_type != "cpu" or Dist.from_env().enabled:
        return None
    return Sizer(vocab_size, budget, train_chars)


def _sizing_event(cfg: TrainConfig, record: dict) -> SizingEvent:
    return SizingEvent(cfg.layers, {int(h): v for h, v in record["chars_per_s"].items()},
                       {int(h): v for h, v in record["chars_per_param"].items()}, record["hidden"],
                       record["rule_chars_per_param"], record["budget_s"], tuple(record["timed"]), record["seconds"])


def _load_new_corpus(corpus: list[Path], cfg: TrainConfig, init_from: Path | None, init: dict | None):
    """(train, validation, vocab, fingerprints); fine-tuning reads the corpus with the checkpoint's vocabulary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        parts = [encode(p, cfg.encoding_errors) for p in corpus]
        data, vocab = join_encoded(parts, Vocab(init["vocab"]) if init else None)
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
    return train_data, val_data, vocab, [e.sha256 for e in parts]


def resumed_run(run_dir: Path, threads: int | None, device: str | None, allow_changed_corpus: bool,
                events: TrainEvents, precision: str | None = None) -> Parts:
    """A run continued from its newest readable checkpoint, its folder locked before anything in it is read.

    A corpus file whose bytes differ from those the run started on is refused (CheckpointError),
    unless `allow_changed_corpus`; checkpoints written before fingerprints were kept are not checked.
    `precision` switches the run's own (see charrnn/precision.py).
    """
    run_dir = Path(run_dir)
    folder = RunFolder.claim_existing(run_dir, main=Dist.from_env().main)
    with folder.released_on_error():
        ck = newest_checkpoint(run_dir, on_warn=lambda m: events.on_warn(WarnEvent(m)))
        cfg = TrainConfig.from_dict(ck["train"]["config"])
        cfg = replace(cfg, threads=threads or cfg.threads, device=device or cfg.device,
                      precision=precision or cfg.precision)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        train_data, val_data, vocab, sha = _load_saved_corpus(run_dir, ck, cfg, allow_changed_corpus, events)
        corpus = [Path(p) for p in ck["train"]["corpus"]]
        start = Start(cfg, corpus, sha, vocab, train_data, val_data,
                      RunState.from_checkpoint(ck["train"]["state"], cfg), ModelConfig(**ck["model_config"]),
                      weights=ck["model"], source=ck["path"], record=ck.get("sentiment"), saved=ck,
                      precision_asked=precision,
                      lexicon=Lexicon.from_record(ck.get("lexicon")) or _count_words(corpus, cfg))
        device, dist = setup_distributed(cfg)
        return _assemble(start, folder, device, dist, events)


def _load_saved_corpus(run_dir: Path, ck: dict, cfg: TrainConfig, allow_changed: bool, events: TrainEvents):
    """(train, validation, vocab, fingerprints) of a resumed run's corpus, read with its checkpoint's vocabulary."""
    corpus = [Path(p) for p in ck["train"]["corpus"]]
    for p in corpus:
        if not p.exists():
            raise CheckpointError(f"cannot resume: the run's corpus file {p} is gone (put it back at that path)")
    parts = [encode(p, cfg.encoding_errors) for p in corpus]
    recorded = ck["train"].get("corpus_sha256")
    changed = [] if not recorded or len(recorded) != len(parts) else [  # none recorded: from before fingerprints
        (e.path, then, e.sha256) for e, then in zip(parts, recorded) if then and then != e.sha256]
    if changed and not allow_changed:
        p, then, now = changed[0]
        raise CheckpointError(
            f"cannot resume: the corpus file {p} changed since the run started (sha256 {then[:12]}... then, "
            f"{now[:12]}... now); put the original back, or go on with its new text: "
            f"'charrnn train --resume {run_dir} --allow-changed-corpus'"
        )
    for p, _, _ in changed:
        events.on_warn(WarnEvent(f"{p} changed since the run started; going on with its new text (--allow-changed-corpus)"))
    data, vocab = join_encoded(parts, Vocab(ck["vocab"]))
    train_data, val_data = split(data, cfg.val_frac)
    return train_data, val_data, vocab, [e.sha256 for e in parts]


def _assemble(start: Start, folder: RunFolder, device: torch.device, dist: Dist, events: TrainEvents) -> Parts:
    """The shared assembly: model, optimiser and precision, objective and carried state, on the device.

    A resumed run (`start.saved`) gets its optimiser, loss scale, carried state and random state
    back, so it goes on exactly as if it had never stopped; its metrics past the checkpoint go.
    """
    cfg, saved = start.cfg, start.saved
    torch.manual_seed(cfg.seed)  # the initial weights of a new run (a resumed one loads its own)
    model = CharRNN(start.model_config).to(device)
    if start.weights is not None:
        ckpt_mod.load_weights(model, {"model": start.weights}, Path(start.source))  # one line when they do not fit
    net = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        with dist.guard():  # DDP starts by sending rank 0's weights to every process
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # 0: plain Adam
    rows = dist.shard(cfg.batch_size)
    choice = _precision(start, device, dist, model, rows.stop - rows.start)
    precision = Precision(device, choice.name)
    if saved is None:
        carry = model.init_state(rows.stop - rows.start, device)
    else:
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot resume: the optimiser state in {start.source} does not fit its model "
                                  f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
        precision.load_state_dict(saved.get("scaler"))  # fp16: the loss scale it had reached
        # the carried state of all B streams; this process takes its rows (the process count may differ)
        carry = tuple(s[:, rows].contiguous().to(device) for s in saved["train"]["carry"])
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        folder.truncate_metrics(start.state.step)
    if not folder.locks_supported:
        events.on_warn(WarnEvent(f"the file system of {folder.path} has no file locks: nothing stops a second "
                                 "process from writing to this run at the same time"))
    objective = _objective(cfg, model, start.corpus, start.vocab, start.train_data,
                           len(start.train_data) + len(start.val_data), start.record)
    return Parts(**vars(start), folder=folder, device=device, dist=dist, model=model, net=net, optimizer=optimizer,
                 precision=precision, precision_choice=choice, rows=rows, carry=carry, objective=objective,
                 evaluated=saved is not None and saved.get("val_loss") is not None)


def _precision(start: Start, device: torch.device, dist: Dist, model: CharRNN, batch: int) -> Choice:
    """The run's precision (charrnn/precision.py), rank 0's under torchrun (a measurement may differ
    between processes), recorded in its state so that a resume trains the same way."""
    cfg = start.cfg
    if start.saved is None:
        choice = choose(cfg.precision, device, model, batch, cfg.seq_len)
    else:
        choice = for_resume(start.state.precision, start.precision_asked, device, model, batch, cfg.seq_len)
    choice = Choice(*broadcast_object(dist, [choice.name, choice.why]))
    start.state.precision = choice.name
    return choice


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
            "corpus_sha256": t.corpus_sha256,  # resume refuses a changed corpus
            "state": dict(t.state.__dict__),
            "step": t.state.step,
            "carry": tuple(s.detach().cpu() for s in carry),
        },
        **({"sentiment": record} if record else {}),
        **({"lexicon": t.lexicon.to_record()} if t.lexicon is not None else {}),
        **({"scaler": t.precision.state_dict()} if t.precision.scaler is not None else {}),
    }
