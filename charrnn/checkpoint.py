"""Checkpoints in run folders: names, atomic saves and checked loads, listing, lookup, damaged files set aside.

A checkpoint is one safetensors file, `step_00000100.safetensors` (the format: charrnn.ckptfile),
with a JSON sidecar caching what listings need (charrnn.ckptinfo). This module is the API the rest
of charrnn uses; it re-exports the names callers use from the modules it was split into
(ckptfile, ckptinfo, ckptmodel, ckptmaint, atomicfile).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from charrnn import __version__
from charrnn.atomicfile import atomic_write, atomic_write_text  # noqa: F401 (re-exported)
from charrnn.ckptfile import (  # noqa: F401 (re-exported)
    FORMAT, FORMAT_VERSION, SUFFIX, ZIP_MAGIC, _decode, _encode_parts, _read, encode, pack, unpack,
)
from charrnn.ckptinfo import (  # noqa: F401 (re-exported)
    _SIDECAR_OWN, CkptInfo, _real, _sidecar_meta, info, sidecar, verify, write_sidecar,
)
from charrnn.ckptmodel import MODEL_KEYS, build_model, check_payload, load_weights  # noqa: F401 (re-exported)
from charrnn.errors import CheckpointDamaged, CheckpointError  # noqa: F401 (re-exported)

LEGACY_SUFFIX = ".pt"  # torch.save zips, written before charrnn stored safetensors
CKPT_GLOB = "step_*" + SUFFIX
LEGACY_GLOB = "step_*" + LEGACY_SUFFIX
DAMAGED = ".damaged"  # appended to the name of a checkpoint set aside as damaged
DEFAULT_HOME = Path("checkpoints")

Warn = Callable[[str], None]  # how the library reports a damaged file it set aside; the CLI prints it


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}{SUFFIX}"


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The checkpoint files of a run folder, in both formats (damaged ones set aside are not included)."""
    run_dir = Path(run_dir)
    return sorted([*run_dir.glob(CKPT_GLOB), *run_dir.glob(LEGACY_GLOB)])


def step_paths(run_dir: Path, step: int) -> list[Path]:
    """The files holding this step's checkpoint, in either format."""
    name = ckpt_name(step)
    return [p for p in (Path(run_dir) / name, (Path(run_dir) / name).with_suffix(LEGACY_SUFFIX)) if p.exists()]


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether a folder holds checkpoint files, readable, damaged or set aside."""
    run_dir = Path(run_dir)
    return any(run_dir.glob(CKPT_GLOB + "*")) or any(run_dir.glob(LEGACY_GLOB + "*"))


# ---------------------------------------------------------------- save and load


def save(path: Path, payload: dict, stamp: bool = True) -> int:
    """Save a checkpoint payload atomically; returns its size in bytes. Disk errors become CheckpointError.

    `stamp` records this charrnn's version and the time; `upgrade` keeps the original ones instead.
    A sidecar already beside the file is brought up to date, so listings keep trusting it.
    """
    path = Path(path)
    payload = dict(payload)
    payload["format"] = FORMAT
    payload["format_version"] = FORMAT_VERSION
    if stamp or "saved_at" not in payload:
        payload["versions"] = {"charrnn": __version__, "torch": str(torch.__version__)}
        payload["saved_at"] = time.time()
    parts, _tensors = _encode_parts(payload)  # the parts point into _tensors, kept alive until written
    try:  # a sidecar describing the file being replaced is brought up to date below
        old = json.loads(sidecar(path).read_text())
        old = old if isinstance(old, dict) and old.get("file") == path.name else None
    except (OSError, ValueError):
        old = None

    def write(f) -> None:
        for part in parts:
            f.write(part)

    try:
        atomic_write(path, write)
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e}; the checkpoints saved before it are kept "
            "(free some disk space or make the folder writable)"
        ) from None
    if old is not None:
        step = payload["train"].get("step") if isinstance(payload.get("train"), dict) else None
        try:
            write_sidecar(path, step if _real(step) else old.get("step", 0), payload.get("val_loss"),
                          {k: v for k, v in old.items() if k not in _SIDECAR_OWN})
        except OSError:
            sidecar(path).unlink(missing_ok=True)  # a stale sidecar must not stay trusted
    return sum(memoryview(p).nbytes for p in parts)


def load(path: Path, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file (or a run folder's best), checking all of its content; nothing in it can run."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return open_checkpoint(path, device=device)[1]
    return _decode(path, _read(path), device)


# ---------------------------------------------------------------- run folders


def set_aside(path: Path, why: str, on_warn: Warn | None = None) -> Path | None:
    """Rename a damaged checkpoint (and its sidecar) to NAME.damaged, never deleting it; returns the new path."""
    path = Path(path)

    def free(p: Path) -> Path:
        target, n = p.with_name(p.name + DAMAGED), 1
        while target.exists():
            n += 1
            target = p.with_name(f"{p.name}{DAMAGED}.{n}")
        return target

    side = sidecar(path)
    try:
        side_names_it = json.loads(side.read_text()).get("file") in (path.name, None)
    except (OSError, ValueError, AttributeError):
        side_names_it = side.exists()
    target = free(path)
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None  # moved or deleted meanwhile (another process, or a rotation)
    except OSError as e:
        if on_warn:
            on_warn(f"{path} is damaged ({why}) and could not be set aside ({e.strerror or e}); it is skipped")
        return None
    if side_names_it:
        try:
            os.rename(side, free(side))
        except OSError:
            pass
    if on_warn:
        on_warn(f"{path} is damaged ({why}); set it aside as {target.name} and skipped it")
    return target


def list_checkpoints(run_dir: Path, verify_all: bool = False, on_warn: Warn | None = None) -> list[CkptInfo]:
    """The checkpoints of a run folder, oldest step first.

    Files found damaged are set aside (reported through `on_warn`); others this charrnn cannot read are
    skipped. `verify_all` checks every file's content instead of trusting the sidecars. Where a step
    is in both formats (an upgrade cut short), the safetensors file stands for it.
    """
    by_step: dict[int, CkptInfo] = {}
    for p in checkpoint_paths(run_dir):
        try:
            i = verify(p) if verify_all else info(p)
        except CheckpointDamaged as e:
            set_aside(p, e.why, on_warn)
            continue
        except CheckpointError:
            continue
        if i.step not in by_step or p.suffix == SUFFIX:
            by_step[i.step] = i
    return sorted(by_step.values(), key=lambda i: i.step)


def best_of(infos: list[CkptInfo]) -> CkptInfo | None:
    """The checkpoint with the lowest validation loss (newest on ties); the newest if none has one."""
    scored = [i for i in infos if i.val_loss is not None]
    if scored:
        return min(scored, key=lambda i: (i.val_loss, -i.step))
    return infos[-1] if infos else None


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and (bool(checkpoint_paths(path)) or (Path(path) / "metrics.jsonl").exists())


def open_checkpoint(path: Path | None, home: Path = DEFAULT_HOME, device: str | torch.device = "cpu",
                    on_warn: Warn | None = None) -> tuple[Path, dict]:
    """(file, payload) from a checkpoint file, a run folder (its best good checkpoint), an export folder
    (charrnn.export; the folder stands for the file) or nothing (the latest run's).

    In a run folder a damaged best is set aside (reported through `on_warn`) and the next best used;
    a file named directly is never moved: its damage is the error.
    """
    if path is None:
        runs = [r for r in list_runs(home) if list_checkpoints(r, on_warn=on_warn)]
        if not runs:
            raise CheckpointError(
                f"no checkpoints found in {Path(home).resolve()}; train one with 'charrnn train CORPUS' or name a checkpoint"
            )
        path = max(runs, key=lambda r: max(i.saved_at for i in list_checkpoints(r)))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    from charrnn import export

    if path.is_file() and path.name == export.MODEL_FILE and export.is_export(path.parent):
        path = path.parent  # an export's weights alone would lack its config and vocabulary
    if export.is_export(path):
        return path, export.load_export(path, device)
    if path.is_file():
        return path, load(path, device)
    infos = list_checkpoints(path, on_warn=on_warn)
    while infos:
        best = best_of(infos)
        try:
            return best.path, load(best.path, device)
        except CheckpointDamaged as e:
            set_aside(best.path, e.why, on_warn)
            infos.remove(best)
    raise CheckpointError(f"no checkpoints found in {path}; is it a run folder? ('charrnn checkpoints list' shows runs)")


def resolve(path: Path | None, home: Path = DEFAULT_HOME, on_warn: Warn | None = None) -> Path:
    """A checkpoint file from a file, a run folder (its best good checkpoint) or nothing (the latest run's best)."""
    path = None if path is None else Path(path)
    if path is not None and path.is_file():
        return path
    return open_checkpoint(path, home, on_warn=on_warn)[0]


def list_runs(home: Path = DEFAULT_HOME) -> list[Path]:
    home = Path(home)
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if p.is_dir() and is_run_dir(p))


def load_model(path: Path | None, device: str | torch.device = "cpu", home: Path = DEFAULT_HOME,
               on_warn: Warn | None = None):
    """(model in eval mode, vocab, checkpoint dict) from a checkpoint, a run folder or the latest run."""
    from charrnn.data import Vocab

    path, ck = open_checkpoint(path, home, device, on_warn)
    model = build_model(ck, path)
    model.to(device).eval()
    ck["path"] = str(path)
    return model, Vocab(ck["vocab"]), ck


_MAINT = ("rotate", "clean_temp_files", "upgrade", "_same", "_kept")  # in charrnn.ckptmaint, which imports this module


def __getattr__(name: str):
    if name in _MAINT:
        from charrnn import ckptmaint

        return getattr(ckptmaint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
