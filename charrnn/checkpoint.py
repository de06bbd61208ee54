"""Checkpoints and run folders: atomic, checksummed saves that load without unpickling; rotation and lookup.

A checkpoint is one safetensors file, `step_00000100.safetensors`. Its payload (the nested dict the
trainer builds) is split in two: every tensor (weights, optimiser moments, RNG states, carried state)
goes in the tensor table under a path-like key, and the rest (config, vocabulary, run state) is a JSON
skeleton in the header's metadata, beside a sha256 of the whole content that every load checks. So
loading never runs the unpickler, and a damaged file is caught instead of silently used. Older `.pt`
files (a torch.save zip) still load, through torch.load(weights_only=True) after a check of the zip's
CRCs. A JSON sidecar beside each checkpoint caches its step, validation loss, size and digest for
fast listing; it is trusted only while it names the file and has its size.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import math
import os
import pickle
import re
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from charrnn import __version__
from charrnn.errors import CheckpointDamaged, CheckpointError

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1  # the payload's layout (its keys and their meaning), the same in both file formats
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"  # torch.save zips, written before charrnn stored safetensors
CKPT_GLOB = "step_*" + SUFFIX
LEGACY_GLOB = "step_*" + LEGACY_SUFFIX
DAMAGED = ".damaged"  # appended to the name of a checkpoint set aside as damaged
DEFAULT_HOME = Path("checkpoints")
ZIP_MAGIC = b"PK\x03\x04"

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


# ---------------------------------------------------------------- payload <-> tensors + JSON
#
# The skeleton is plain JSON; what JSON cannot say is tagged with a one-key object: {"$tensor": key},
# {"$tuple": [...]}, {"$float": "nan"}, and {"$dict": [[key, value], ...]} for a dict whose keys are
# not all strings (Adam's `state` is keyed by parameter index) or that has a key starting with "$".

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def pack(payload) -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON skeleton, tensors by key) for any nesting of dicts, lists, tuples, tensors and plain values."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path: str):
        if isinstance(x, torch.Tensor):
            key = path.lstrip("/") or "tensor"
            while key in tensors:  # two paths can only meet through odd dict keys ("a/b" and a -> b)
                key += "'"
            tensors[key] = x.detach().to("cpu").contiguous()  # no copy when it is already so
            return {"$tensor": key}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"$float": repr(x)}
        if isinstance(x, tuple):
            return {"$tuple": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            return {"$dict": [[walk(k, f"{path}/{k}#key"), walk(v, f"{path}/{k}")] for k, v in x.items()]}
        raise TypeError(f"a checkpoint cannot hold a {type(x).__name__} (at {path or 'the top'})")

    return walk(payload, ""), tensors


def unpack(skeleton, tensors: dict[str, torch.Tensor] | None, device: str | torch.device = "cpu"):
    """The payload back from `pack`'s output; with tensors=None, tensors come back as None (a quick look)."""

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (tag, v), = x.items()
            if tag == "$tensor":
                return None if tensors is None else tensors[v].to(device)
            if tag == "$tuple":
                return tuple(walk(i) for i in v)
            if tag == "$float":
                return float(v)
            if tag == "$dict":
                return {walk(k): walk(val) for k, val in v}
        return {k: walk(v) for k, v in x.items()}

    return walk(skeleton)


# ---------------------------------------------------------------- the safetensors container
#
# The container is written and read here, following the safetensors specification (8-byte little-endian
# header length, JSON header with each tensor's dtype, shape and data offsets, then the data). The
# reference package's own writer needs numpy, which charrnn does not; tests read these files back
# with the reference reader. Reading parses JSON and copies bytes into tensors: nothing in a file runs.


def _tensor_buffer(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor, without a copy; valid while `t` lives."""
    n = t.numel() * t.element_size()
    return (ctypes.c_ubyte * n).from_address(t.data_ptr()) if n else b""


def _digest(header: dict, chunks) -> str:
    """sha256 of a file's whole content: its tensor table and metadata (less this digest), then its data."""
    table = dict(header)
    meta = dict(table.pop("__metadata__", None) or {})
    meta.pop("sha256", None)
    h = hashlib.sha256(json.dumps({**table, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _encode_parts(payload: dict) -> tuple[list, dict]:
    """(the file's pieces in order: header, then each tensor's bytes; the tensors those pieces point into)."""
    if sys.byteorder != "little":
        raise CheckpointError("charrnn writes checkpoints on little-endian machines only (safetensors stores little-endian)")
    skeleton, tensors = pack(payload)
    # Larger elements first, so that every tensor starts at a multiple of its element size.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    table, chunks, offset = {}, [], 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _DTYPES:
            raise TypeError(f"a checkpoint cannot hold a {t.dtype} tensor ({key})")
        n = t.numel() * t.element_size()
        table[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        chunks.append(_tensor_buffer(t))
        offset += n
    meta = {"format": FORMAT, "payload": json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}
    header = {**table, "__metadata__": meta}
    meta["sha256"] = _digest(header, chunks)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return [len(text).to_bytes(8, "little") + text, *chunks], tensors


def encode(payload: dict) -> bytes:
    """A payload as safetensors bytes (see the module docstring), with the checksum `load` verifies."""
    parts, _tensors = _encode_parts(payload)
    return b"".join(bytes(p) for p in parts)


def _split(raw) -> tuple[dict, memoryview, int]:
    """(header, data section, where the data starts) of safetensors bytes; ValueError when they are not that."""
    if len(raw) < 8:
        raise ValueError(f"only {len(raw)} bytes")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError("cut short: the header runs past the end of the file")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, memoryview(raw)[8 + n :], 8 + n


_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def _tensors(header: dict, raw: bytearray, start: int) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read into `raw` (its data section at `start`), as views of it.

    Views, not copies: loading costs one read of the file. The writer aligns every tensor; a file that
    does not gets a copy of each misaligned tensor.
    """
    out = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        dtype = _BY_NAME[spec["dtype"]]
        begin, end = spec["data_offsets"]
        shape = [int(d) for d in spec["shape"]]
        esize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(raw) - start or end - begin != math.prod(shape) * esize:
            raise ValueError(f"the table's entry for {key} does not fit the data")
        if begin == end:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(raw, dtype=dtype, count=(end - begin) // esize, offset=start + begin).view(shape)
        out[key] = t.clone() if t.data_ptr() % esize else t
    return out


def _damaged(path: Path, why: str) -> CheckpointDamaged:
    return CheckpointDamaged(
        f"{path} is truncated or damaged ({why}); use another checkpoint of its run, or the run folder, "
        "which skips damaged checkpoints", why)


def _decode_safetensors(path: Path, raw, device, with_tensors: bool) -> dict:
    try:
        header, data, start = _split(raw)
    except ValueError as e:
        raise _damaged(path, str(e)) from None
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    if "sha256" not in meta:
        if meta.get("format") == FORMAT:
            raise _damaged(path, "its checksum is missing")
        raise CheckpointError(f"{path} is not a charrnn checkpoint (a safetensors file without charrnn's format marker)")
    if _digest(header, [data]) != meta["sha256"]:
        raise _damaged(path, "its content does not match the checksum saved with it")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (a safetensors file without charrnn's format marker)")
    try:
        skeleton = json.loads(meta["payload"])
        if not with_tensors:
            return unpack(skeleton, None)
        return unpack(skeleton, _tensors(header, raw, start), device)
    except Exception as e:  # the checksum matched, so the writer itself was not charrnn's
        raise CheckpointError(f"{path} is not a readable charrnn checkpoint ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _decode_legacy(path: Path, raw: bytes, device) -> dict:
    """A torch.save zip: its CRCs checked (torch.load skips them), then unpickled with weights_only=True."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            bad = z.testzip()
    except Exception as e:  # cut short, or not a zip after all
        raise _damaged(path, f"not a readable zip archive: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}") from None
    if bad is not None:
        raise _damaged(path, f"the CRC of {bad} inside it does not match")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain data, "
                "which could run code; only load checkpoints written by charrnn"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None
    except Exception as e:  # zip and pickle errors of every kind
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _damaged(path, msg[:120]) from None


def _read(path: Path) -> bytearray:
    try:
        with open(path, "rb") as f:
            raw = bytearray(os.fstat(f.fileno()).st_size)
            got = f.readinto(raw)
        return raw if got == len(raw) else raw[:got]
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _decode(path: Path, raw: bytes, device="cpu", with_tensors: bool = True) -> dict:
    """The payload of a checkpoint file's bytes, in either format, with its format marker checked."""
    if raw[:4] == ZIP_MAGIC:
        ck = _decode_legacy(path, raw, device)
    elif path.suffix == SUFFIX or raw[8:9] == b"{":
        ck = _decode_safetensors(path, raw, device, with_tensors)
    else:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (not a safetensors file, not a PyTorch zip archive)")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (it has no charrnn format marker)")
    if ck.get("format_version") != FORMAT_VERSION:
        versions = ck.get("versions") if isinstance(ck.get("versions"), dict) else {}
        raise CheckpointError(
            f"{path} uses checkpoint format {ck.get('format_version')}, this charrnn reads format "
            f"{FORMAT_VERSION}; use the charrnn version that wrote it ({versions.get('charrnn', '?')})"
        )
    return ck


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
    """(file, payload) from a checkpoint file, a run folder (its best good checkpoint) or nothing (the latest run's).

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


# ---------------------------------------------------------------- what a payload must hold

MODEL_KEYS = ("vocab_size", "cell", "layers", "hidden", "embed", "dropout")  # model_config entries read on load


def check_payload(ck: dict, path: Path, train: bool = False) -> None:
    """A one-line CheckpointError when a loaded payload lacks what building its model (and, with
    `train`, showing or resuming its run) needs, or has model settings this charrnn does not know."""
    import dataclasses

    from charrnn.model import ModelConfig

    def need(d: dict, key: str, kind, where: str = ""):
        if key not in d:
            raise CheckpointError(f"{path} lacks '{where}{key}'; it was not written by charrnn, or was edited")
        if not isinstance(d[key], kind) or isinstance(d[key], bool) and kind is not bool:
            raise CheckpointError(f"{path} has a malformed '{where}{key}'; it was not written by charrnn, or was edited")
        return d[key]

    mc = need(ck, "model_config", dict)
    unknown = sorted(set(mc) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        versions = ck.get("versions") if isinstance(ck.get("versions"), dict) else {}
        raise CheckpointError(
            f"{path} has model settings this charrnn does not know ({', '.join(map(str, unknown))}); "
            f"use the charrnn version that wrote it ({versions.get('charrnn', '?')})")
    for key in MODEL_KEYS:
        need(mc, key, str if key == "cell" else (float, int) if key == "dropout" else int, "model_config.")
    vocab = need(ck, "vocab", str)
    if len(vocab) != mc["vocab_size"]:
        raise CheckpointError(
            f"{path} has a vocabulary of {len(vocab)} characters for a model of {mc['vocab_size']}; "
            "it was not written by charrnn, or was edited")
    weights = need(ck, "model", dict)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} has a malformed 'model' (not all tensors); it was not written by charrnn, or was edited")
    if train:
        tr = need(ck, "train", dict)
        need(tr, "step", int, "train.")
        need(tr, "config", dict, "train.")
        need(tr, "state", dict, "train.")
        need(tr, "corpus", list, "train.")


def build_model(ck: dict, path: Path):
    """The model a checkpoint describes, with its weights; CheckpointError (one line) when they do not fit."""
    from charrnn.model import CharRNN, ModelConfig

    check_payload(ck, path)
    try:
        model = CharRNN(ModelConfig(**ck["model_config"]))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not match this charrnn's model code ({str(e).splitlines()[0][:100]})") from None
    load_weights(model, ck, path)
    return model


def load_weights(model, ck: dict, path: Path) -> None:
    try:
        model.load_state_dict(ck["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this charrnn's model code ({str(e).splitlines()[0][:100]})") from None


def load_model(path: Path | None, device: str | torch.device = "cpu", home: Path = DEFAULT_HOME,
               on_warn: Warn | None = None):
    """(model in eval mode, vocab, checkpoint dict) from a checkpoint, a run folder or the latest run."""
    from charrnn.data import Vocab

    path, ck = open_checkpoint(path, home, device, on_warn)
    model = build_model(ck, path)
    model.to(device).eval()
    ck["path"] = str(path)
    return model, Vocab(ck["vocab"]), ck


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
