"""The training loop: truncated BPTT over contiguous streams, evaluation, checkpoints and exact resume.

Progress is reported through a callback `callback(event, data)`; this module never prints.
Events: "start", "step", "eval", "save", "warn", "end".
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from charrnn import checkpoint as ckpt_mod
from charrnn.config import DEFAULT_TIME_S, TrainConfig, resolve, validate
from charrnn.data import StreamBatcher, Vocab, load_corpus, split
from charrnn.distributed import Dist, broadcast_object
from charrnn.errors import CheckpointError, TrainingDiverged, UsageError
from charrnn.model import CharRNN, ModelConfig

Callback = Callable[[str, dict], None]
LOG_EVERY = 10  # steps between "step" events and metrics lines
MAX_BAD_STEPS = 3  # consecutive non-finite steps before rolling back
MAX_ROLLBACKS = 4  # rollbacks (each halving the learning rate) before giving up
EXPLODE_FACTOR = 10.0  # a training loss above this many times ln(V) (a uniform guess) has exploded
# Test-only: "N" puts a NaN into one weight the first time step N is reached; "N+" every time
# (a run that cannot recover). Lets tests force a real divergence; unset in normal use.
TEST_NAN_ENV = "CHARRNN_TEST_NAN_AT"
DEFAULT_MAX_EPOCHS = 50  # cap on a run given no length at all


def _noop(event: str, data: dict) -> None:
    pass


# ---------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CheckpointError("--device mps was asked for, but MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the card supports it, else fp16. None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- schedule


def lr_at(step: int, total: int, cfg: TrainConfig, scale: float = 1.0) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_frac at the last step."""
    peak = cfg.lr * scale
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = peak * cfg.min_lr_frac
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: CharRNN, data: torch.Tensor, max_chars: int | None = None, seq_len: int = 256,
             streams: int = 64, device: torch.device | None = None, dist: Dist | None = None) -> tuple[float, int]:
    """Mean loss (nats/char) over `data`, read as contiguous streams with the state carried along.

    Returns (loss, characters scored). Switches the model to eval mode and restores its mode.
    """
    device = device or model.head.weight.device
    if max_chars is not None:
        data = data[:max_chars]
    n = len(data)
    if n < 2:
        raise UsageError("not enough text to evaluate on (need at least 2 characters)")
    streams = max(1, min(streams, n // (seq_len + 1)))
    stream_len = n // streams
    rows = data[: streams * stream_len].view(streams, stream_len)  # (S, L); a short tail is not scored
    if dist is not None and dist.enabled:
        rows = rows[dist.rank :: dist.world]  # each process scores its share of the streams
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        state = model.init_state(rows.shape[0], device)
        for p in range(0, stream_len - 1, seq_len):
            chunk = rows[:, p : p + seq_len + 1].long().to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            logits, _, state = model(x, state=state)  # (S, T, V)
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        total, count = dist.sum([total, float(count)])
        count = int(count)
    return total / max(count, 1), count


# ---------------------------------------------------------------- the run


@dataclass
class RunState:
    """Everything about a run's progress that a checkpoint must carry for an exact resume."""

    step: int = 0  # optimiser steps done; also the index of the next batch
    total_steps: int = 0  # the schedule's length
    elapsed_s: float = 0.0  # wall-clock seconds trained so far, over all sessions
    train_s: float = 0.0  # of which in training steps (not evaluation or saving)
    chars_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    lr_scale: float = 1.0  # lowered after a rollback from non-finite values
    rollbacks: int = 0
    evals_since_best: int = 0  # for --patience
    time_budget_s: float | None = None
    history: list = field(default_factory=list)


def default_run_dir(home: Path, corpus: list[Path], cfg: TrainConfig) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(corpus[0]).stem)[:40] or "corpus"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = home / f"{stem}-{cfg.cell}-{cfg.layers}x{cfg.hidden}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))
        raise CheckpointError(
            f"cannot write to {folder}: {why}; move it away or choose a writable folder with --run"
        ) from None


def _setup_distributed(cfg: TrainConfig) -> tuple[torch.device, Dist]:
    """The device, and the process group when started by torchrun (one process per device or core)."""
    device = pick_device(cfg.device)
    dist = Dist.from_env()
    if dist.enabled:
        dist.check_batch(cfg.batch_size)
        if cfg.sentiment_unit:
            raise UsageError("--sentiment-unit runs in one process; start it without torchrun")
        dist.setup(device.type)
        device = dist.device(device)
    return device, dist


def _warner(callback: Callback | None) -> Callable[[str], None]:
    """A "warn" event for the checkpoint code to report through, from the main process only (as the Trainer's own)."""
    cb = (callback or _noop) if Dist.from_env().main else _noop
    return lambda message: cb("warn", {"message": message})


def _check_resumable(ck: dict, path: Path) -> None:
    """One line, not a KeyError or TypeError, when a checkpoint lacks what resuming needs."""
    ckpt_mod.check_payload(ck, path, train=True)
    for key in ("optimizer", "rng"):
        if not isinstance(ck.get(key), dict):
            raise CheckpointError(f"cannot resume from {path}: it lacks '{key}'; start a new run from its weights "
                                  f"with 'charrnn train CORPUS --init-from {path}'")
    tr = ck["train"]
    if not isinstance(tr.get("carry"), (tuple, list)) or not isinstance(ck["rng"].get("torch"), torch.Tensor):
        raise CheckpointError(f"cannot resume from {path}: it lacks its carried state or RNG state; start a new run "
                              f"from its weights with 'charrnn train CORPUS --init-from {path}'")
    unknown = sorted(set(tr["state"]) - set(RunState.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"cannot resume from {path}: its run state has fields this charrnn does not know "
                              f"({', '.join(map(str, unknown))}); resume it with the charrnn version that wrote it")


class Trainer:
    """One training run. Build it with `Trainer.new`, `Trainer.resume`; then call `run()`."""

    def __init__(self, cfg: TrainConfig, model: CharRNN, vocab: Vocab, train_data: torch.Tensor,
                 val_data: torch.Tensor, run_dir: Path, corpus: list[Path], state: RunState,
                 device: torch.device, callback: Callback | None = None):
        self.cfg, self.model, self.vocab = cfg, model, vocab
        self.train_data, self.val_data = train_data, val_data
        self.run_dir, self.corpus, self.state, self.device = run_dir, corpus, state, device
        self.dist = Dist.from_env()
        self.callback = (callback or _noop) if self.dist.main else _noop
        self.batcher = StreamBatcher(train_data, cfg.batch_size, cfg.seq_len)
        self.rows = self.dist.shard(cfg.batch_size)  # this process's streams
        self.local_batch = self.rows.stop - self.rows.start
        self.net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.amp_dtype = autocast_dtype(device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.carry = model.init_state(self.local_batch, device)
        self.extra: dict = {}  # other checkpoint fields carried along (e.g. a sentiment unit)
        # Extension point: an object with before_step(step, carry) -> carry (called right before the
        # forward pass) and extra_loss(carry, x, y, carry_in, logits) -> tensor (added to the objective, not to the reported loss).
        # Used by `train --sentiment-unit` (charrnn.sentiment.Binding); None in plain runs.
        self.binding = None
        self._stop_signal: int | None = None
        self._good: dict | None = None
        self._last_saved_step: int | None = None
        hook = os.environ.get(TEST_NAN_ENV, "")
        self._nan_at = int(hook.rstrip("+")) if hook.rstrip("+").isdigit() else None
        self._nan_always = hook.endswith("+")

    # ------------------------------------------------------------ construction

    @classmethod
    def new(cls, corpus: list[Path], cfg: TrainConfig, run_dir: Path | None = None,
            init_from: Path | None = None, home: Path = ckpt_mod.DEFAULT_HOME,
            callback: Callback | None = None) -> "Trainer":
        validate(cfg)
        corpus = [Path(p) for p in corpus]
        if run_dir is not None and ckpt_mod.holds_checkpoints(run_dir):  # readable or not: never replaced
            raise CheckpointError(
                f"{run_dir} already holds a run; continue it with 'charrnn train --resume {run_dir}' "
                "or choose another --run folder"
            )
        init = None
        vocab = None
        if init_from is not None:
            warn = _warner(callback)
            init_path, init = ckpt_mod.open_checkpoint(Path(init_from), home, on_warn=warn)
            ckpt_mod.check_payload(init, init_path)
            vocab = Vocab(init["vocab"])
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            data, vocab = load_corpus(corpus, vocab=vocab, errors=cfg.encoding_errors)
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
        budget = cfg.time_s
        if cfg.steps is None and cfg.epochs is None and cfg.time_s is None:
            budget = DEFAULT_TIME_S
        cfg = resolve(cfg, len(train_data), budget if cfg.steps is None and cfg.epochs is None else None,
                      pick_device(cfg.device).type)
        if init is not None:  # the architecture comes from the checkpoint
            mc = init["model_config"]
            cfg.cell, cfg.layers, cfg.hidden, cfg.embed = mc["cell"], mc["layers"], mc["hidden"], mc["embed"]
            if cfg.dropout != mc["dropout"] and cfg.dropout is None:
                cfg.dropout = mc["dropout"]
        device, dist = _setup_distributed(cfg)
        torch.manual_seed(cfg.seed)
        model = CharRNN(ModelConfig(len(vocab), cfg.cell, cfg.layers, cfg.hidden, cfg.embed, cfg.dropout)).to(device)
        if init is not None:
            ckpt_mod.load_weights(model, init, init_path)
        state = RunState(time_budget_s=budget)
        batcher = StreamBatcher(train_data, cfg.batch_size, cfg.seq_len)
        if cfg.steps is not None:
            state.total_steps = cfg.steps
        elif cfg.epochs is not None:
            state.total_steps = max(1, math.ceil(cfg.epochs * batcher.batches_per_epoch))
        else:
            # a time budget: an estimate, refined as the run measures its own speed
            state.total_steps = 10**9
            if cfg.time_s is None:
                state.total_steps = DEFAULT_MAX_EPOCHS * batcher.batches_per_epoch
        if cfg.eval_every is None and state.time_budget_s is None:
            cfg.eval_every = max(1, min(1000, state.total_steps // 10))
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(Path(home), corpus, cfg)
        run_dir = broadcast_object(dist, run_dir)  # every process writes (through rank 0) to one folder
        if dist.main:
            _check_writable(run_dir)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # left by an earlier start killed before its first save
        trainer = cls(cfg, model, vocab, train_data, val_data, run_dir, corpus, state, device, callback)
        if init is not None and init.get("sentiment"):
            trainer.extra["sentiment"] = init["sentiment"]
        trainer._attach_binding()
        return trainer

    @classmethod
    def resume(cls, run_dir: Path, callback: Callback | None = None, threads: int | None = None,
               device: str | None = None) -> "Trainer":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: no run folder at {run_dir}")
        warn = _warner(callback)
        infos = ckpt_mod.list_checkpoints(run_dir, on_warn=warn)
        if not infos:
            raise CheckpointError(
                f"cannot resume: no checkpoints in {run_dir} (not a run folder, or the run stopped before its first save); "
                "start it again with 'charrnn train CORPUS --run " + str(run_dir) + "'"
            )
        ckpt_mod.clean_temp_files(run_dir)
        ck = None
        for info in reversed(infos):  # the newest readable checkpoint; a damaged one is set aside
            try:
                ck = ckpt_mod.load(info.path)
                break
            except ckpt_mod.CheckpointDamaged as e:
                ckpt_mod.set_aside(info.path, e.why, warn)
            except CheckpointError:
                continue
        if ck is None:
            raise CheckpointError(f"cannot resume: no readable checkpoint in {run_dir}")
        _check_resumable(ck, info.path)
        cfg = TrainConfig.from_dict(ck["train"]["config"])
        if threads:
            cfg.threads = threads
        if device:
            cfg.device = device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        corpus = [Path(p) for p in ck["train"]["corpus"]]
        for p in corpus:
            if not p.exists():
                raise CheckpointError(f"cannot resume: the run's corpus file {p} is gone (put it back at that path)")
        vocab = Vocab(ck["vocab"])
        data, _ = load_corpus(corpus, vocab=vocab, errors=cfg.encoding_errors)
        train_data, val_data = split(data, cfg.val_frac)
        dev, dist = _setup_distributed(cfg)
        model = ckpt_mod.build_model(ck, info.path).to(dev)
        st = RunState(**ck["train"]["state"])
        trainer = cls(cfg, model, vocab, train_data, val_data, run_dir, corpus, st, dev, callback)
        try:
            trainer.optimizer.load_state_dict(ck["optimizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot resume: the optimiser state in {info.path} does not fit its model "
                                  f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
        # the carried state of all B streams; this process takes its rows (the process count may differ)
        trainer.carry = tuple(s[:, trainer.rows].contiguous().to(dev) for s in ck["train"]["carry"])
        torch.set_rng_state(ck["rng"]["torch"])
        if dev.type == "cuda" and ck["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        if ck.get("sentiment"):
            trainer.extra["sentiment"] = ck["sentiment"]
        trainer._attach_binding()
        if dist.main:
            trainer._truncate_metrics(st.step)
        if ck.get("val_loss") is not None:
            trainer._last_saved_step = st.step  # already evaluated and saved: the end need not redo it
        return trainer

    def _attach_binding(self) -> None:
        """Install the sentiment binding when the run asks for it (TrainConfig.sentiment_unit)."""
        if self.cfg.sentiment_unit:
            from charrnn.sentiment import Binding

            self.binding = Binding.for_trainer(self)

    # ------------------------------------------------------------ checkpoints and metrics

    def payload(self, val_loss: float | None) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = dict(self.state.__dict__)
        return {
            "model_config": self.model.config.to_dict(),
            "vocab": self.vocab.chars,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "val_loss": val_loss,
            "train": {
                "config": self.cfg.to_dict(),
                "corpus": [str(p.resolve()) for p in self.corpus],
                "state": state,
                "step": self.state.step,
                "carry": tuple(s.detach().cpu() for s in self._full_carry),
            },
            **self.extra,
        }

    def save(self, val_loss: float | None) -> Path:
        """Save this step's checkpoint (atomically), then delete those beyond the best and the --keep newest.

        A checkpoint already on disk for this step is kept as it is, unless it lacks a validation
        loss that this save has (the same weights, evaluated) or is damaged (then it is set aside and
        the step redone): files are replaced, never rewritten.
        """
        path = self.run_dir / ckpt_mod.ckpt_name(self.state.step)
        self._full_carry = self.dist.gather_rows(self.carry)  # collective: every process takes part
        if not self.dist.main:
            return path
        warn = lambda m: self.callback("warn", {"message": m})
        older = ckpt_mod.step_paths(self.run_dir, self.state.step)  # this step, either format
        for old_path in older:
            try:  # the file's own content decides, not its sidecar: a damaged one is redone
                old = ckpt_mod.verify(old_path)
                if old.val_loss is not None or val_loss is None:
                    return old_path
            except ckpt_mod.CheckpointDamaged as e:
                ckpt_mod.set_aside(old_path, e.why, warn)
            except CheckpointError:
                pass  # unreadable here: replace it
        try:
            size = ckpt_mod.save(path, self.payload(val_loss))
        except CheckpointError as e:
            raise CheckpointError(f"{e}; then continue with 'charrnn train --resume {self.run_dir}'") from None
        mc = self.model.config
        try:
            for old_path in older:  # a .pt of this step, now replaced
                if old_path != path:
                    old_path.unlink(missing_ok=True)
            ckpt_mod.write_sidecar(path, self.state.step, val_loss,
                                   {"cell": mc.cell, "layers": mc.layers, "hidden": mc.hidden})
            removed = ckpt_mod.rotate(self.run_dir, self.cfg.keep, on_warn=warn)
        except OSError as e:
            raise CheckpointError(
                f"saved {path} but could not update {self.run_dir}: {e.strerror or e}; free some disk space, "
                f"then continue with 'charrnn train --resume {self.run_dir}'"
            ) from None
        self.callback("save", {"path": str(path), "size": size, "removed": [str(i.path) for i in removed]})
        return path

    def _metrics(self, record: dict) -> None:
        if not self.dist.main:
            return
        try:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(
                f"could not write {self.run_dir / 'metrics.jsonl'}: {e.strerror or e}; the checkpoints "
                f"saved so far are kept; free some disk space and continue with 'charrnn train --resume {self.run_dir}'"
            ) from None

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics lines past the checkpoint being resumed, which the resumed run will redo."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short by a kill
        try:
            ckpt_mod.atomic_write_text(path, "".join(l + "\n" for l in kept))
        except OSError as e:
            raise CheckpointError(
                f"cannot resume: {self.run_dir} is not writable ({e.strerror or e}); free some space or make it "
                "writable, then run the same command again"
            ) from None

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    # ------------------------------------------------------------ the loop

    def _snapshot(self) -> None:
        """Remember the last good state in memory, for rollback after non-finite values."""
        self._good = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "carry": tuple(s.clone() for s in self.carry),
            "step": self.state.step,
        }

    def _rollback(self) -> None:
        """Go back to the last good in-memory state with half the learning rate, or give up (and save it)."""
        st = self.state
        bad_step = st.step
        self.model.load_state_dict(self._good["model"])
        self.optimizer.load_state_dict(self._good["optimizer"])
        self.carry = tuple(s.clone() for s in self._good["carry"])
        st.step = self._good["step"]
        if st.rollbacks >= MAX_ROLLBACKS:
            path = self.save(None)  # the last good state, if it is not on disk already
            raise TrainingDiverged(
                f"training diverged at step {bad_step} (loss or gradients not finite or exploding) and did not "
                f"recover after {st.rollbacks} rollbacks with the learning rate halved each time; the last good "
                f"state (step {st.step}) is saved in {path}; start again from it with a lower learning rate, e.g. "
                f"'charrnn train CORPUS --init-from {path} --lr {self.cfg.lr * st.lr_scale / 10:.2g}"
                + (" --grad-clip 1'" if self.cfg.grad_clip == 0 else "'")
            )
        st.rollbacks += 1
        st.lr_scale *= 0.5
        self.callback("warn", {"message": f"step {bad_step}: {MAX_BAD_STEPS} bad steps in a row; rolled back to "
                                          f"step {st.step} (the last good state) and halved the learning rate "
                                          f"(now {self.cfg.lr * st.lr_scale:.3g})"})

    def _test_poison(self) -> None:
        """The test-only $CHARRNN_TEST_NAN_AT hook: a NaN in one weight, as a real overflow would leave."""
        if self._nan_at is not None and self.state.step == self._nan_at:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
            if not self._nan_always:
                self._nan_at = None

    def _train_step(self) -> tuple[float, float, str | None]:
        """One optimiser step. Returns (loss, grad norm, problem); on a problem nothing is updated."""
        cfg, st = self.cfg, self.state
        x, y, epoch_start = self.batcher.get(st.step)
        x, y = x[self.rows], y[self.rows]  # (b, T): this process's streams
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if epoch_start:
            self.carry = self.model.init_state(self.local_batch, self.device)
        lr = lr_at(st.step, st.total_steps, cfg, st.lr_scale)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._test_poison()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.binding is not None:
                self.carry = self.binding.before_step(st.step, self.carry)
            hook = None if self.binding is None else self.binding.hook
            logits, loss, carry = self.net(x, y, self.carry, hook=hook)
            objective = loss if self.binding is None else loss + self.binding.extra_loss(carry, x, y, self.carry, logits)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            objective.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss_v, norm_v = loss.item(), norm.item()
        if self.dist.enabled:  # every process must take the same decision: judge the mean loss
            loss_v = self.dist.sum([loss_v])[0] / self.dist.world
        if not math.isfinite(loss_v):
            return loss_v, norm_v, "non-finite loss"
        if loss_v > EXPLODE_FACTOR * math.log(max(len(self.vocab), 2)):
            return loss_v, norm_v, f"exploding loss ({loss_v:.3g} nats/char)"
        if not math.isfinite(norm_v):
            if self.scaler is None:
                return loss_v, norm_v, "non-finite gradient"
            # fp16 overflow: GradScaler skips this update and lowers its scale, as designed
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.carry = self.model.detach_state(carry)
        return loss_v, norm_v, None

    def _estimate_total(self, t_start: float, step_start: int) -> None:
        """For a time budget: set the schedule's length from the speed measured so far."""
        st = self.state
        done = st.step - step_start
        spent = time.perf_counter() - t_start
        if done < 5 or spent <= 0:
            return
        left = st.time_budget_s - st.elapsed_s
        st.total_steps = max(st.step + 1, st.step + int(left * done / spent))
        if self.cfg.eval_every is None:
            self.cfg.eval_every = max(10, (st.total_steps - st.step) // 10)
        if self.dist.enabled:  # rank 0's estimate, on every process
            total, every = self.dist.broadcast([float(st.total_steps), float(self.cfg.eval_every)])
            st.total_steps, self.cfg.eval_every = int(total), int(every)

    def _evaluate(self) -> float:
        loss, _ = evaluate(self.model, self.val_data, self.cfg.eval_chars, device=self.device, dist=self.dist)
        return loss

    def run(self) -> dict:
        """Train to the end of the run (or a signal), evaluating and saving on the way; returns a summary.

        SIGINT and SIGTERM stop the loop at the next step boundary; the run then saves and returns
        with reason "interrupted". The handlers stay installed until the last save is on disk.
        """
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            return self._run()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.dist.close()

    def _run(self) -> dict:
        cfg, st = self.cfg, self.state
        self.model.train()
        timed = st.time_budget_s is not None and cfg.steps is None and cfg.epochs is None
        self.callback("start", {
            "run_dir": str(self.run_dir), "params": self.model.num_params(), "config": cfg.to_dict(),
            "train_chars": len(self.train_data), "val_chars": len(self.val_data), "vocab_size": len(self.vocab),
            "total_steps": st.total_steps, "time_budget_s": st.time_budget_s if timed else None,
            "device": str(self.device), "resumed_from": st.step or None,
        })
        t_session = time.perf_counter()
        elapsed_base = st.elapsed_s
        step_start = st.step
        bad = 0
        last_val = None
        last_log_t, last_log_chars = time.perf_counter(), st.chars_seen
        chars_per_step = cfg.batch_size * cfg.seq_len
        self._snapshot()
        reason = "done"
        while True:
            st.elapsed_s = elapsed_base + (time.perf_counter() - t_session)
            out_of_time = timed and st.elapsed_s >= st.time_budget_s
            stop = self._stop_signal is not None
            if self.dist.enabled:  # all processes stop together
                out_of_time, stop = (bool(v) for v in self.dist.max([float(out_of_time), float(stop)]))
                if stop and self._stop_signal is None:
                    self._stop_signal = signal.SIGTERM
            if st.step >= st.total_steps or out_of_time:
                break
            if stop:
                reason = "interrupted"
                break
            t0 = time.perf_counter()
            loss_v, norm_v, problem = self._train_step()
            st.train_s += time.perf_counter() - t0
            if problem is not None:
                bad += 1
                self.callback("warn", {"message": f"step {st.step}: {problem}, step skipped"})
                if bad >= MAX_BAD_STEPS:
                    self._rollback()
                    bad = 0
                else:
                    st.step += 1  # skip this batch
                continue
            bad = 0
            st.step += 1
            st.chars_seen += chars_per_step
            if timed and (st.step - step_start in (20, 100) or (cfg.eval_every and st.step % cfg.eval_every == 0)):
                self._estimate_total(t_session, step_start)
            if st.step % LOG_EVERY == 0 or st.step == st.total_steps:
                now = time.perf_counter()
                rec = {
                    "step": st.step, "elapsed_s": round(elapsed_base + now - t_session, 3),
                    "chars_per_s": round(st.chars_seen / max(st.train_s, 1e-9), 1),
                    "loss": round(loss_v, 5), "lr": lr_at(st.step - 1, st.total_steps, cfg, st.lr_scale),
                    "grad_norm": round(norm_v, 5) if math.isfinite(norm_v) else None,
                }
                self._metrics(rec)
                self.callback("step", {**rec, "total_steps": st.total_steps, "grad_norm": rec["grad_norm"] or 0.0,
                                       "recent_chars_per_s": (st.chars_seen - last_log_chars) / max(now - last_log_t, 1e-9),
                                       "time_budget_s": st.time_budget_s if timed else None})
                last_log_t, last_log_chars = now, st.chars_seen
            if (cfg.eval_every and st.step % cfg.eval_every == 0) or st.step >= st.total_steps:
                # the last evaluation happens in the loop too, so a rollback there trains on
                last_val = self._eval_and_save(elapsed_base, t_session)
                if cfg.patience and st.evals_since_best >= cfg.patience and st.step < st.total_steps:
                    reason = "early stop"
                    break
        st.elapsed_s = elapsed_base + (time.perf_counter() - t_session)
        if reason == "interrupted":
            path = self.save(None)  # a no-op when this step was just evaluated and saved
            self.callback("end", {"reason": reason, "signal": self._stop_signal, "step": st.step, "path": str(path),
                                  "run_dir": str(self.run_dir), "best_val_loss": st.best_val_loss})
            return {"reason": reason, "signal": self._stop_signal, "step": st.step, "run_dir": self.run_dir,
                    "best_val_loss": st.best_val_loss, "val_loss": None}
        if st.step != self._last_saved_step:  # a time budget ran out between evaluations
            last_val = self._eval_and_save(elapsed_base, t_session)
        summary = {
            "reason": reason, "patience": cfg.patience, "step": st.step, "run_dir": self.run_dir, "val_loss": last_val,
            "best_val_loss": st.best_val_loss, "best_step": st.best_step, "elapsed_s": st.elapsed_s,
            "chars_per_s": st.chars_seen / max(st.train_s, 1e-9), "params": self.model.num_params(),
        }
        self.callback("end", {**summary, "run_dir": str(self.run_dir)})
        return summary

    def _eval_and_save(self, elapsed_base: float, t_session: float) -> float:
        st = self.state
        val = self._evaluate()
        if not math.isfinite(val):
            self.callback("warn", {"message": f"step {st.step}: validation loss is not finite; rolling back"})
            self._rollback()
            return float("nan")
        improved = st.best_val_loss is None or val < st.best_val_loss
        if improved:
            st.best_val_loss, st.best_step = val, st.step
            st.evals_since_best = 0
        else:
            st.evals_since_best += 1
        st.elapsed_s = elapsed_base + (time.perf_counter() - t_session)
        rec = {"step": st.step, "elapsed_s": round(st.elapsed_s, 3),
               "chars_per_s": round(st.chars_seen / max(st.train_s, 1e-9), 1),
               "val_loss": val, "val_bpc": val / math.log(2)}
        self._metrics(rec)
        self.callback("eval", {**rec, "best": improved, "total_steps": st.total_steps})
        self.save(val)
        self._last_saved_step = st.step
        self._snapshot()
        return val
