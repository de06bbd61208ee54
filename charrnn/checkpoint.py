"""Checkpoints and run folders: atomic, self-contained saves, safe loads, rotation and lookup."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from charrnn import __version__
from charrnn.errors import CheckpointError

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1
CKPT_GLOB = "step_*.pt"
DEFAULT_HOME = Path("checkpoints")


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}.pt"


# ---------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file in the same folder, then rename it into place.

    `write(f)` gets the open binary file. A crash at any moment leaves either the old file or
    the complete new one, never a partial file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------- save and load


def save(path: Path, payload: dict) -> int:
    """Save a checkpoint payload atomically; returns its size in bytes. Disk errors become CheckpointError."""
    payload = dict(payload)
    payload["format"] = FORMAT
    payload["format_version"] = FORMAT_VERSION
    payload["versions"] = {"charrnn": __version__, "torch": str(torch.__version__)}
    payload["saved_at"] = time.time()
    # Serialise in memory first: torch.save turns a failed write (disk full) into an obscure
    # RuntimeError, while a plain write raises OSError with the real reason (ENOSPC, EFBIG, EROFS).
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        atomic_write(path, lambda f: f.write(buf.getbuffer()))
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e}; the checkpoints saved before it are kept "
            "(free some disk space or make the folder writable)"
        ) from None
    return path.stat().st_size


def load(path: Path, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (weights_only=True: no code in the file can run) and check its format."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return load(resolve(path), device)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{path} is not a charrnn checkpoint (not a PyTorch zip archive)")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain data, "
                "which could run code; only load checkpoints written by charrnn"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except Exception as e:  # zip, pickle and I/O errors of every kind: truncated, damaged, not a checkpoint
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a charrnn checkpoint, or it is truncated or damaged ({msg[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (it has no charrnn format marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {ckpt.get('format_version')}, this charrnn reads format "
            f"{FORMAT_VERSION}; use the charrnn version that wrote it ({ckpt.get('versions', {}).get('charrnn', '?')})"
        )
    return ckpt


# ---------------------------------------------------------------- run folders


@dataclass
class CkptInfo:
    path: Path
    step: int
    val_loss: float | None
    size: int
    saved_at: float

    @property
    def val_bpc(self) -> float | None:
        import math

        return None if self.val_loss is None else self.val_loss / math.log(2)


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_sidecar(path: Path, step: int, val_loss: float | None, extra: dict | None = None) -> None:
    meta = {"file": path.name, "step": step, "val_loss": val_loss, "size": path.stat().st_size, "saved_at": time.time()}
    meta.update(extra or {})
    atomic_write_text(sidecar(path), json.dumps(meta) + "\n")


def info(path: Path) -> CkptInfo:
    """What is known of a checkpoint from its JSON sidecar (or, lacking one, the file itself)."""
    try:
        meta = json.loads(sidecar(path).read_text())
        return CkptInfo(path, int(meta["step"]), meta.get("val_loss"), path.stat().st_size, float(meta["saved_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        ck = load(path)
        return CkptInfo(path, int(ck["train"]["step"]), ck.get("val_loss"), path.stat().st_size, ck.get("saved_at", 0.0))


def list_checkpoints(run_dir: Path) -> list[CkptInfo]:
    """The checkpoints of a run folder, oldest step first (unreadable files are skipped)."""
    out = []
    for p in sorted(Path(run_dir).glob(CKPT_GLOB)):
        try:
            out.append(info(p))
        except CheckpointError:
            continue
    return sorted(out, key=lambda i: i.step)


def best_of(infos: list[CkptInfo]) -> CkptInfo | None:
    """The checkpoint with the lowest validation loss (newest on ties); the newest if none has one."""
    scored = [i for i in infos if i.val_loss is not None]
    if scored:
        return min(scored, key=lambda i: (i.val_loss, -i.step))
    return infos[-1] if infos else None


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and (any(Path(path).glob(CKPT_GLOB)) or (Path(path) / "metrics.jsonl").exists())


def resolve(path: Path | None, home: Path = DEFAULT_HOME) -> Path:
    """A checkpoint file from a file, a run folder (its best checkpoint) or nothing (the latest run's best)."""
    if path is None:
        runs = list_runs(home)
        runs = [r for r in runs if list_checkpoints(r)]
        if not runs:
            raise CheckpointError(
                f"no checkpoints found in {home.resolve()}; train one with 'charrnn train CORPUS' or name a checkpoint"
            )
        path = max(runs, key=lambda r: max(i.saved_at for i in list_checkpoints(r)))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    if path.is_file():
        return path
    best = best_of(list_checkpoints(path))
    if best is None:
        raise CheckpointError(f"no checkpoints found in {path}; is it a run folder? ('charrnn checkpoints list' shows runs)")
    return best.path


def list_runs(home: Path = DEFAULT_HOME) -> list[Path]:
    home = Path(home)
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if p.is_dir() and is_run_dir(p))


def rotate(run_dir: Path, keep: int, dry_run: bool = False) -> list[CkptInfo]:
    """Delete checkpoints that are neither the best nor among the `keep` newest; returns those deleted."""
    infos = list_checkpoints(run_dir)
    best = best_of(infos)
    keep_paths = {i.path for i in infos[-max(keep, 1) :]}
    if best is not None:
        keep_paths.add(best.path)
    removed = [i for i in infos if i.path not in keep_paths]
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
    leftovers += [p for p in run_dir.glob("step_*.json") if not p.with_suffix(".pt").exists()]
    for p in leftovers:
        try:
            p.unlink()
        except OSError:
            pass


def load_model(path: Path | None, device: str | torch.device = "cpu", home: Path = DEFAULT_HOME):
    """(model in eval mode, vocab, checkpoint dict) from a checkpoint, a run folder or the latest run."""
    from charrnn.data import Vocab
    from charrnn.model import CharRNN, ModelConfig

    path = resolve(path, home)
    ck = load(path, device)
    try:
        model = CharRNN(ModelConfig(**ck["model_config"]))
        model.load_state_dict(ck["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this charrnn's model code ({str(e).splitlines()[0][:100]})") from None
    model.to(device).eval()
    ck["path"] = str(path)
    return model, Vocab(ck["vocab"]), ck
