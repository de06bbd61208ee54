"""A run's folder on disk: its checkpoints (saved atomically, with sidecars, rotated), metrics.jsonl and samples.jsonl.

Only the main process writes; the others hold a RunFolder with main=False, whose writes do nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from charrnn import checkpoint as ckpt_mod
from charrnn.config import TrainConfig
from charrnn.distributed import Dist, broadcast_object
from charrnn.errors import CheckpointError
from charrnn.events import SaveEvent
from charrnn.runlock import LOCK_NAME, RunLock

METRICS = "metrics.jsonl"  # one JSON record per line: training steps and evaluations
SAMPLES = "samples.jsonl"  # one JSON record per evaluation: the seeded sample drawn there


def default_run_dir(home: Path, corpus: list[Path], cfg: TrainConfig) -> Path:
    """A new, empty run folder under `home`, created here: CORPUS-CELL-LxH-DATE-TIME, or with -2, -3...

    The folder is made with an exclusive mkdir, so runs started in the same second (the name's
    resolution) each get their own folder: testing for a name and creating it later would let two
    of them pick the same one.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(corpus[0]).stem)[:40] or "corpus"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = home / f"{stem}-{cfg.cell}-{cfg.layers}x{cfg.hidden}-{stamp}"
    check_writable(home)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue  # taken, by an earlier run or one starting right now
        except OSError as e:
            raise CheckpointError(f"cannot create a run folder in {home}: {e.strerror or e}; "
                                  "choose a writable folder with --run") from None


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{threading.get_ident()}"  # one per thread that starts a run
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (e.strerror or str(e))
        raise CheckpointError(
            f"cannot write to {folder}: {why}; move it away or choose a writable folder with --run"
        ) from None


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never replaces a checkpoint (readable or not) in the folder it is given."""
    if ckpt_mod.holds_checkpoints(run_dir):
        raise CheckpointError(
            f"{run_dir} already holds a run; continue it with 'charrnn train --resume {run_dir}' "
            "or choose another --run folder"
        )


def newest_checkpoint(run_dir: Path, on_warn=None) -> dict:
    """The newest readable checkpoint of a run folder, after clearing the temp files of a killed save.

    A damaged one is set aside (renamed, reported through `on_warn`) and the one before it used;
    one that lacks what resuming needs is one line (CheckpointError), never a KeyError.
    """
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: no run folder at {run_dir}")
    infos = ckpt_mod.list_checkpoints(run_dir, on_warn=on_warn)
    if not infos:
        raise CheckpointError(
            f"cannot resume: no checkpoints in {run_dir} (not a run folder, or the run stopped before its first save); "
            "start it again with 'charrnn train CORPUS --run " + str(run_dir) + "'"
        )
    ckpt_mod.clean_temp_files(run_dir)
    for info in reversed(infos):
        try:
            ck = ckpt_mod.load(info.path)
        except ckpt_mod.CheckpointDamaged as e:
            ckpt_mod.set_aside(info.path, e.why, on_warn)
            continue
        except CheckpointError:
            continue
        check_resumable(ck, info.path)
        ck["path"] = str(info.path)
        return ck
    raise CheckpointError(f"cannot resume: no readable checkpoint in {run_dir}")


def check_resumable(ck: dict, path: Path) -> None:
    """One line, not a KeyError or TypeError, when a checkpoint lacks what resuming needs."""
    from charrnn.runstate import RunState

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


class RunFolder:
    """Where one run writes: checkpoints named by step, their sidecars, and the metrics log."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = path, main
        self.metrics = path / METRICS
        self.samples = path / SAMPLES
        self.lock: RunLock | None = None  # held (on the main process) from the claim until the run ends

    @classmethod
    def claim_new(cls, run_dir: Path | None, make_default: Callable[[], Path], dist: Dist) -> "RunFolder":
        """A new run's folder (`run_dir`, or one the main process makes), locked and without a metrics
        log left by an earlier start killed before its first save; every process gets the same path."""
        path = Path(run_dir) if run_dir is not None else make_default() if dist.main else None
        folder = cls(Path(broadcast_object(dist, str(path) if path is not None else None)), main=dist.main)
        if folder.main:
            check_writable(folder.path)
            folder.lock = RunLock(folder.path).acquire()
            with folder.released_on_error(remove=run_dir is None):
                if run_dir is not None:
                    refuse_existing_run(folder.path)  # one may have started, saved and ended since the first check
                folder.metrics.unlink(missing_ok=True)
                folder.samples.unlink(missing_ok=True)
        return folder

    @classmethod
    def claim_existing(cls, run_dir: Path, main: bool) -> "RunFolder":
        """A run's folder to resume, locked before anything in it is read for use or deleted."""
        folder = cls(Path(run_dir), main=main)
        if main and ckpt_mod.holds_checkpoints(folder.path):  # not a run folder: newest_checkpoint says so
            folder.lock = RunLock(folder.path).acquire()
        return folder

    @property
    def locks_supported(self) -> bool:
        return self.lock is None or self.lock.supported

    @contextmanager
    def released_on_error(self, remove: bool = False):
        """Let go of the lock when what follows fails; `remove`: also the folder, if still empty (one
        this run made, that nobody else knows)."""
        try:
            yield
        except BaseException:
            if self.lock is not None:
                if remove:
                    (self.path / LOCK_NAME).unlink(missing_ok=True)
                    try:
                        self.path.rmdir()
                    except OSError:
                        pass  # not empty (or already gone): leave it
                self.release()
            raise

    def release(self) -> None:
        """The last save is on disk: another process may take the run."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def resume_hint(self) -> str:
        """How to go on after a failure, from what is saved."""
        if ckpt_mod.list_checkpoints(self.path):
            return f"the checkpoints saved so far are kept; continue with 'charrnn train --resume {self.path}'"
        return "no checkpoint was saved yet; start the run again"

    def checkpoint_path(self, step: int) -> Path:
        return self.path / ckpt_mod.ckpt_name(step)

    def save(self, step: int, val_loss: float | None, payload: Callable[[], dict], keep: int,
             arch: dict, on_warn=None) -> SaveEvent | None:
        """Save this step's checkpoint (atomically), then delete those beyond the best and the `keep` newest.

        A checkpoint already on disk for this step is kept as it is (None is returned), unless it
        lacks a validation loss that this save has (the same weights, evaluated) or is damaged (then
        it is set aside and the step redone): files are replaced, never rewritten.
        """
        path = self.checkpoint_path(step)
        if not self.main:
            return None
        older = ckpt_mod.step_paths(self.path, step)  # this step, either format
        if any(self._keeps(p, val_loss, on_warn) for p in older):
            return None
        try:
            size = ckpt_mod.save(path, payload())
        except CheckpointError as e:
            raise CheckpointError(f"{e}; then continue with 'charrnn train --resume {self.path}'") from None
        try:
            for old in older:  # a .pt of this step, now replaced
                if old != path:
                    old.unlink(missing_ok=True)
            ckpt_mod.write_sidecar(path, step, val_loss, arch)
            removed = ckpt_mod.rotate(self.path, keep, on_warn=on_warn)
        except OSError as e:
            raise CheckpointError(
                f"saved {path} but could not update {self.path}: {e.strerror or e}; free some disk space, "
                f"then continue with 'charrnn train --resume {self.path}'"
            ) from None
        return SaveEvent(path=path, size=size, removed=tuple(i.path for i in removed))

    @staticmethod
    def _keeps(path: Path, val_loss: float | None, on_warn=None) -> bool:
        """Whether the file already saved for this step stands; its own content decides, not its sidecar."""
        if not path.exists():
            return False
        try:
            return ckpt_mod.verify(path).val_loss is not None or val_loss is None
        except ckpt_mod.CheckpointDamaged as e:
            ckpt_mod.set_aside(path, e.why, on_warn)
            return False
        except CheckpointError:
            return False  # unreadable: replace it

    def append_metrics(self, record: dict) -> None:
        self._append(self.metrics, record)

    def append_sample(self, record: dict) -> None:
        self._append(self.samples, record)

    def _append(self, log: Path, record: dict) -> None:
        if not self.main:
            return
        try:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(
                f"could not write {log}: {e.strerror or e}; the checkpoints saved so far are kept; "
                f"free some disk space and continue with 'charrnn train --resume {self.path}'"
            ) from None

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics and samples lines past the checkpoint being resumed, which the resumed run will redo."""
        for log in (self.metrics, self.samples):
            self._truncate(log, step)

    def _truncate(self, log: Path, step: int) -> None:
        if not self.main or not log.exists():
            return
        kept = []
        for line in log.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short by a kill
        try:
            ckpt_mod.atomic_write_text(log, "".join(l + "\n" for l in kept))
        except OSError as e:
            raise CheckpointError(
                f"cannot resume: {self.path} is not writable ({e.strerror or e}); free some space or make it "
                "writable, then run the same command again"
            ) from None
