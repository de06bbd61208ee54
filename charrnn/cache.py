"""The encoded-corpus cache on disk: entries keyed on a file's content, their temp files, listing and clearing.

An entry is KEY.bin (the ids, memory-mapped when used) and KEY.json (the vocabulary, the length and
where the text came from). KEY holds the SHA-256 of the file's bytes, never its path, size or mtime:
those survive `cp -p`, `rsync -t`, `touch -r` and quick rewrites, which would serve stale ids.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from charrnn.runlock import is_stale_temp

# 2: keyed on the file's content, a leading byte-order mark dropped (1: keyed on path, size and mtime)
CACHE_VERSION = 2


def cache_dir() -> Path:
    """Where encoded corpora are cached: $CHARRNN_CACHE, else $XDG_CACHE_HOME/charrnn, else ~/.cache/charrnn."""
    if os.environ.get("CHARRNN_CACHE"):
        return Path(os.environ["CHARRNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charrnn"


# Measurements of this machine kept beside the corpora, each in a folder of its own (listing treats
# every top-level *.json as a corpus entry): training widths' speeds (charrnn/sizing.py) and
# sampling's precision choice (charrnn/sampleprecision.py). `clear` deletes them too, so a
# measurement taken in a busy moment is taken again.
# kind -> (file, the name of its table): each file is {"version": MEASUREMENT_VERSION, table: {key: entry}}.
MEASUREMENTS = {"sizing": ("speeds.json", "speeds"), "precision": ("sample.json", "choices")}
MEASUREMENT_VERSION = 1


def measurement_file(kind: str) -> Path:
    return cache_dir() / kind / MEASUREMENTS[kind][0]


def read_measurements(kind: str, path: Path | None = None) -> dict:
    """The kind's table of measurements; an absent, unreadable or damaged file is an empty table (it is rewritten)."""
    table = MEASUREMENTS[kind][1]
    try:
        data = json.loads((path or measurement_file(kind)).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != MEASUREMENT_VERSION or not isinstance(data.get(table), dict):
        return {}
    return data[table]


def remember_measurement(kind: str, key: str, entry: dict, path: Path | None = None) -> None:
    """Add one entry to the kind's table, atomically (temp file, rename); a damaged file reads as empty, so this
    replaces it with a good one. A cache that cannot be written is skipped: the next run measures again."""
    from charrnn.atomicfile import atomic_write_text

    path = path or measurement_file(kind)
    entries = read_measurements(kind, path)
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": MEASUREMENT_VERSION, MEASUREMENTS[kind][1]: entries},
                                           indent=1, sort_keys=True))
    except OSError:
        pass  # read-only or full: nothing worse than measuring again


def _paths(sha256: str, errors: str) -> tuple[Path, Path]:
    key = f"v{CACHE_VERSION}-{sha256[:32]}-{errors}"
    cdir = cache_dir()
    return cdir / f"{key}.bin", cdir / f"{key}.json"


def _dtype(chars: str) -> torch.dtype:
    return torch.uint8 if len(chars) <= 256 else torch.int32


def lookup(sha256: str, errors: str) -> tuple[torch.Tensor, str] | None:
    """(ids memory-mapped from the cache, the vocabulary's characters) for this content, or None."""
    bin_path, meta_path = _paths(sha256, errors)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("sha256") != sha256:
            return None
        chars, n = meta["chars"], int(meta["length"])
        dtype = _dtype(chars)
        if bin_path.stat().st_size != n * dtype.itemsize:
            return None  # cut short (a full disk): rebuilt by the caller
        ids = torch.from_file(str(bin_path), shared=False, size=n, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # missing or damaged (or cleared a moment ago): rebuilt by the caller
    try:
        os.utime(meta_path)  # "last used", for `charrnn cache list`
    except OSError:
        pass  # a read-only cache still serves
    return ids, chars


def store(sha256: str, errors: str, chars: str, n: int, source: Path,
          fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Write a new entry: `fill(out)` writes the n ids into a memory-mapped temp file, renamed into place
    when complete. Returns the ids, memory-mapped. Raises OSError/RuntimeError when the cache is not writable.

    The temp file is flock-ed while it is written, so a sweep (here or on another machine sharing the
    cache) never deletes it; a killed writer's file is swept by the next run (see `sweep`).
    """
    bin_path, meta_path = _paths(sha256, errors)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = bin_path.with_name(f"{bin_path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = torch.from_file(str(tmp), shared=True, size=n, dtype=_dtype(chars))
        fill(out)
        del out
        os.replace(tmp, bin_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    meta = {"version": CACHE_VERSION, "sha256": sha256, "errors": errors, "chars": chars, "length": n,
            "source": str(Path(source).resolve()), "source_bytes": Path(source).stat().st_size}
    tmp_meta = meta_path.with_name(f"{meta_path.name}.tmp{os.getpid()}")
    try:
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
    except BaseException:
        tmp_meta.unlink(missing_ok=True)
        raise
    return torch.from_file(str(bin_path), shared=False, size=n, dtype=_dtype(chars))


# ---------------------------------------------------------------- temp files, listing, clearing


def _being_written(path: Path) -> bool:
    """True while a live process holds the file's flock (store() does, while it encodes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:  # a shared lock: it conflicts with the writer's all the same, and NFS allows it on a read-only fd
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:  # held (or the file system cannot say): keep the file
        return True
    finally:
        os.close(fd)


def _temp_files() -> list[Path]:
    cdir = cache_dir()
    return sorted(cdir.glob("*.tmp*")) if cdir.is_dir() else []


def sweep() -> list[Path]:
    """Delete temp files of encodes that were killed: their writer is dead and holds no lock. Returns them."""
    removed = []
    for p in _temp_files():
        if is_stale_temp(p) and not _being_written(p):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


@dataclass
class Entry:
    key: str
    source: str  # the file the text came from (the first one, when several hold the same text)
    chars: int | None  # characters of text; None for an entry of an older charrnn
    vocab_size: int | None
    bytes: int  # on disk, ids and description together
    last_used: float
    current: bool  # written by this charrnn's cache format


def entries() -> list[Entry]:
    """The cache's entries, most recently used first."""
    cdir = cache_dir()
    out = []
    for meta_path in cdir.glob("*.json") if cdir.is_dir() else []:
        bin_path = meta_path.with_suffix(".bin")
        try:
            meta = json.loads(meta_path.read_text())
            size = meta_path.stat().st_size + (bin_path.stat().st_size if bin_path.exists() else 0)
            used = meta_path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        chars = meta.get("chars")
        out.append(Entry(meta_path.stem, str(meta.get("source", "?")), meta.get("length"),
                         len(chars) if isinstance(chars, str) else None, size, used,
                         meta.get("version") == CACHE_VERSION))
    return sorted(out, key=lambda e: -e.last_used)


@dataclass
class Cleared:
    files: int
    bytes: int
    busy: int  # temp files of encodes running now, left alone


def clear() -> Cleared:
    """Delete every entry and every dead encode's temp file; an encode running now keeps its temp file.

    A run using an entry is not disturbed: it has the ids memory-mapped, and the file lives on until
    it lets go of it.
    """
    files = size = busy = 0
    cdir = cache_dir()
    if not cdir.is_dir():
        return Cleared(0, 0, 0)
    for kind in MEASUREMENTS:
        try:
            p = measurement_file(kind)
            n = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        files, size = files + 1, size + n
    temps = set(_temp_files())
    for p in sorted(cdir.iterdir()):
        if not p.is_file() or (p.suffix not in (".bin", ".json") and p not in temps):
            continue  # not ours
        if p in temps and not (is_stale_temp(p) and not _being_written(p)):
            busy += 1
            continue
        try:
            n = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        files, size = files + 1, size + n
    return Cleared(files, size, busy)

