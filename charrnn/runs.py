"""What `charrnn checkpoints list|show|prune|upgrade` report and do, as plain data (the CLI renders it).

Damaged checkpoints met on the way are set aside by charrnn.checkpoint and reported through on_warn."""

from __future__ import annotations

import json
import time
from pathlib import Path

from charrnn import checkpoint as ckm
from charrnn.checkpoint import Warn


def run_rows(home: Path, on_warn: Warn | None = None) -> list[dict]:
    """One summary per run folder under home: cell and size (from the newest sidecar), checkpoints,
    last step, best validation loss and its file, bytes on disk, last update."""
    return [_run_row(run_dir, on_warn) for run_dir in ckm.list_runs(home)]


def _run_row(run_dir: Path, on_warn: Warn | None) -> dict:
    infos = ckm.list_checkpoints(run_dir, verify_all=True, on_warn=on_warn)
    best = ckm.best_of(infos)
    meta = {}
    if infos:
        try:
            meta = json.loads(ckm.sidecar(infos[-1].path).read_text())
        except (OSError, ValueError):
            meta = {}  # a missing or damaged sidecar leaves the row's cell and size unknown
    disk = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())
    updated = max((i.saved_at for i in infos), default=run_dir.stat().st_mtime)
    return {
        "run": str(run_dir), "cell": meta.get("cell", "-"),
        "size": f"{meta['layers']}x{meta['hidden']}" if "layers" in meta else "-", "checkpoints": len(infos),
        "last_step": infos[-1].step if infos else 0, "best": best.val_loss if best else None,
        "best_path": str(best.path) if best else None, "disk": disk,
        "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(updated)),
    }


def checkpoint_details(path: Path, on_warn: Warn | None = None) -> dict:
    """The checkpoint path names (a file, or a run folder's best): model, training settings and progress,
    vocabulary size, versions, sentiment unit. Plain data: `checkpoints show --json` prints it as is."""
    target, ck = ckm.open_checkpoint(path, on_warn=on_warn)
    ckm.check_payload(ck, target, train=True)
    mc, tr = ck["model_config"], ck["train"]
    st = tr["state"]
    return {
        "checkpoint": str(target), "step": tr["step"], "val_loss": ck.get("val_loss"),
        "best_val_loss": st.get("best_val_loss"), "best_step": st.get("best_step"),
        "model": mc, "params": sum(v.numel() for v in ck["model"].values()), "train": tr["config"],
        "corpus": tr["corpus"], "elapsed_s": st.get("elapsed_s"), "total_steps": st.get("total_steps"),
        "vocab_size": len(ck["vocab"]), "versions": ck.get("versions"), "sentiment": ck.get("sentiment"),
    }


def format_note(checkpoint: str, given: Path) -> str | None:
    """What `checkpoints show` says about the file's format: a hint to upgrade an old .pt file, else None."""
    if Path(checkpoint).suffix == ckm.LEGACY_SUFFIX:
        return f"old .pt file; 'charrnn checkpoints upgrade {given}' rewrites it as .safetensors"
    return None


def checkpoint_files(run_dir: Path, on_warn: Warn | None = None) -> list[dict]:
    """The checkpoints of a run folder, oldest first, the best and the latest marked."""
    infos = ckm.list_checkpoints(run_dir, verify_all=True, on_warn=on_warn)
    best = ckm.best_of(infos)
    return [{"file": i.path.name, "step": i.step, "val_loss": i.val_loss, "size": i.size,
             "mark": "best" if best and i.path == best.path else ("latest" if i is infos[-1] else "")}
            for i in infos]


def prune(folder: Path, keep: int, dry_run: bool = False, on_skip=None, on_warn: Warn | None = None) -> dict:
    """Delete all but the best and the newest `keep` checkpoints of every run under folder (or of folder,
    a run itself), and the temp files saves left; with dry_run only count them. A run being trained is
    left alone: on_skip(who holds it) is called for each. Returns {"checkpoints": deleted, "bytes": freed,
    "runs": runs pruned}."""
    from charrnn.runlock import RunLock, holder

    runs = [folder] if ckm.is_run_dir(folder) else ckm.list_runs(folder)
    freed, count, done = 0, 0, 0
    for run_dir in runs:
        lock = RunLock(run_dir, "checkpoints prune")
        try:  # the run's lock while pruning it, so no training starts or saves meanwhile
            busy = holder(run_dir) if dry_run else lock.try_acquire()
        except OSError:
            busy = None  # a read-only folder: nothing can train there; rotate says what it cannot delete
        if busy is not None:
            if on_skip is not None:
                on_skip(busy)
            continue
        try:
            removed = ckm.rotate(run_dir, keep, dry_run=dry_run, on_warn=on_warn)
            if not dry_run:
                ckm.clean_temp_files(run_dir)
        finally:
            lock.release()
        freed += sum(i.size for i in removed)
        count += len(removed)
        done += 1
    return {"checkpoints": count, "bytes": freed, "runs": done}


def upgrade(path: Path, on_upgraded=None, on_warn: Warn | None = None) -> dict:
    """Rewrite the old .pt checkpoints at path (a file, a run folder or a folder of run folders) as
    .safetensors; on_upgraded(old, new) after each. One that fails is reported through on_warn and the
    others go on. Returns {"files": .pt files found, "failed": [those not upgraded]}."""
    from charrnn.errors import CheckpointError

    if not path.exists():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    if path.is_file():
        files = [path]
    else:
        runs = [path] if ckm.is_run_dir(path) else ckm.list_runs(path)
        files = [p for run_dir in runs for p in sorted(run_dir.glob(ckm.LEGACY_GLOB))]
    failed = []
    for p in files:
        try:
            new = ckm.upgrade(p, on_warn=on_warn)
        except CheckpointError as e:
            if on_warn is not None:
                on_warn(str(e))
            failed.append(p)
            continue
        if on_upgraded is not None:
            on_upgraded(p, new)
    return {"files": len(files), "failed": failed}
