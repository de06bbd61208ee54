"""Run-folder upkeep: rotating old checkpoints out, clearing what killed saves left, upgrading `.pt` files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from charrnn.checkpoint import SUFFIX, LEGACY_SUFFIX, CkptInfo, Warn, best_of, list_checkpoints, load, save, set_aside
from charrnn.ckptinfo import _SIDECAR_OWN, _real, _sidecar_meta, sidecar, verify, write_sidecar
from charrnn.errors import CheckpointDamaged, CheckpointError


def _kept(infos: list[CkptInfo], keep: int) -> list[CkptInfo]:
    best = best_of(infos)
    kept = infos[-max(keep, 1):]
    return kept if best is None or best in kept else [best, *kept]


def rotate(run_dir: Path, keep: int, dry_run: bool = False, on_warn: Warn | None = None) -> list[CkptInfo]:
    """Delete checkpoints that are neither the best nor among the `keep` newest; returns those deleted.

    Before deleting anything, the files kept are verified (content, and the step and loss their
    sidecars claim): a damaged one is set aside and the choice made again without it, so a damaged
    newest or best never costs a healthy checkpoint.
    """
    infos = list_checkpoints(run_dir, on_warn=on_warn)
    checked: set[Path] = set()
    while True:
        kept = _kept(infos, keep)
        if len(kept) == len(infos):
            return []
        todo = next((i for i in kept if i.path not in checked), None)
        if todo is None:
            break
        try:
            real = verify(todo.path)
        except CheckpointDamaged as e:
            if dry_run:
                if on_warn:
                    on_warn(f"{todo.path} is damaged ({e.why}); pruning without --dry-run sets it aside")
            else:
                set_aside(todo.path, e.why, on_warn)
            infos.remove(todo)
            continue
        except CheckpointError:
            infos.remove(todo)  # not readable by this charrnn: neither counted nor deleted
            continue
        checked.add(todo.path)
        if (real.step, real.val_loss) != (todo.step, todo.val_loss):  # a stale sidecar: the file decides
            infos[infos.index(todo)] = real
            infos.sort(key=lambda i: i.step)
    kept_paths = {i.path for i in kept}
    removed = [i for i in infos if i.path not in kept_paths]
    if not dry_run:
        for i in removed:
            for p in (i.path, sidecar(i.path)):
                p.unlink(missing_ok=True)
    return removed


def clean_temp_files(run_dir: Path) -> None:
    """Remove temporary files left by a save that was killed midway, and sidecars whose checkpoint is gone.

    Callers hold the run's lock (charrnn.runlock), so no trainer is writing here; a temporary file
    is still kept while the process named in it may be writing it (another command, such as
    `neuron find` storing a unit, writes into run folders without the lock).
    """
    from charrnn.runlock import is_stale_temp

    run_dir = Path(run_dir)
    leftovers = [p for p in run_dir.glob(".*.tmp*") if is_stale_temp(p)]
    leftovers += [p for p in run_dir.glob("step_*.json")
                  if not p.with_suffix(SUFFIX).exists() and not p.with_suffix(LEGACY_SUFFIX).exists()]
    for p in leftovers:
        try:
            p.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------- upgrading .pt files


def _same(a, b) -> bool:
    """Whether two payloads are equal, tensors bit for bit, NaN equal to NaN, tuples distinct from lists."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
    if type(a) is not type(b) and not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def upgrade(path: Path, on_warn: Warn | None = None) -> Path:
    """Rewrite a `.pt` checkpoint as `.safetensors` beside it (sidecar included); the `.pt` is removed
    only once the new file has been read back and found equal. Returns the new file."""
    path = Path(path)
    ck = load(path)
    new = path.with_suffix(SUFFIX)
    if new.exists():
        try:
            if _same(load(new), ck):  # an earlier upgrade wrote it and stopped before removing the .pt
                path.unlink()
                return new
        except CheckpointDamaged as e:
            set_aside(new, e.why, on_warn)
        except CheckpointError:
            pass
        if new.exists():
            raise CheckpointError(f"cannot upgrade {path}: {new} exists and holds something else; move one of them away")
    side = json.loads(sidecar(path).read_text()) if _sidecar_meta(path) is not None else None
    save(new, ck, stamp=False)
    try:
        same = _same(load(new), ck)
    except CheckpointError:
        same = False
    if not same:
        new.unlink(missing_ok=True)
        raise CheckpointError(f"cannot upgrade {path}: the new file did not read back the same; {path} is kept")
    if side is not None or re.fullmatch(r"step_\d+", path.stem):
        step = ck.get("train", {}).get("step") if isinstance(ck.get("train"), dict) else None
        extra = {k: v for k, v in (side or {}).items() if k not in _SIDECAR_OWN}
        try:
            write_sidecar(new, step if _real(step) else (side or {}).get("step", 0), ck.get("val_loss"), extra)
        except OSError as e:
            raise CheckpointError(f"upgraded {path} to {new.name} but could not write its sidecar: {e.strerror or e}") from None
    path.unlink()
    return new
