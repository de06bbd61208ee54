"""What is known of a checkpoint without loading its tensors: its JSON sidecar, or a check of the file itself.

A JSON sidecar beside each checkpoint caches its step, validation loss, size and digest for fast
listing; it is trusted only while it names the file and has its size.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from charrnn.atomicfile import atomic_write_text
from charrnn.ckptfile import _decode, _read
from charrnn.errors import CheckpointError


@dataclass
class CkptInfo:
    path: Path
    step: int
    val_loss: float | None
    size: int
    saved_at: float

    @property
    def val_bpc(self) -> float | None:
        return None if self.val_loss is None else self.val_loss / math.log(2)


_SIDECAR_OWN = ("file", "step", "val_loss", "size", "sha256", "saved_at")  # the rest is the caller's (cell, ...)


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_sidecar(path: Path, step: int, val_loss: float | None, extra: dict | None = None) -> None:
    raw = path.read_bytes()
    meta = {"file": path.name, "step": step, "val_loss": val_loss, "size": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(), "saved_at": time.time()}
    meta.update(extra or {})
    atomic_write_text(sidecar(path), json.dumps(meta) + "\n")


def _sidecar_meta(path: Path) -> dict | None:
    """The sidecar's content when it describes this very file (its name and size), else None."""
    try:
        meta = json.loads(sidecar(path).read_text())
        if isinstance(meta, dict) and meta.get("file") == path.name and meta.get("size") == path.stat().st_size:
            return meta
    except (OSError, ValueError):
        pass
    return None


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def info(path: Path) -> CkptInfo:
    """What is known of a checkpoint from its JSON sidecar, or, when that is missing or stale, the file itself."""
    meta = _sidecar_meta(path)
    if meta is not None and _real(meta.get("step")) and _real(meta.get("saved_at")) and (
            meta.get("val_loss") is None or _real(meta["val_loss"])):
        return CkptInfo(path, int(meta["step"]), meta["val_loss"], meta["size"], float(meta["saved_at"]))
    return verify(path)


def verify(path: Path) -> CkptInfo:
    """What a checkpoint file itself says (step, validation loss) after checking all of its content.

    Raises CheckpointDamaged when its bytes are not what was saved, CheckpointError when it is not
    a charrnn checkpoint this version reads.
    """
    path = Path(path)
    raw = _read(path)
    ck = _decode(path, raw, with_tensors=False)
    train = ck.get("train")
    if not isinstance(train, dict) or not _real(train.get("step")):
        raise CheckpointError(f"{path} lacks its step ('train.step'); it was not written by charrnn's trainer")
    val = ck.get("val_loss")
    saved_at = ck.get("saved_at")
    return CkptInfo(path, int(train["step"]), val if _real(val) else None, len(raw),
                    float(saved_at) if _real(saved_at) else 0.0)

