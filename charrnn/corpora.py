"""Known public corpora: the catalogue (charrnn/catalog.json, package data), checked downloads, and corpus arguments.

A download streams into a temporary file beside its destination, hashing as it goes; only a file of
the catalogued size and SHA-256 is renamed into place, so a failed or interrupted download leaves
nothing behind and running the command again restarts it. A mirror (a folder, or a base URL holding
the same file names) stands in for the network. Library code: reports through `callback(event, data)`,
raises typed errors, never prints. HTTP uses the standard library only.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import http.client
import importlib.resources
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from charrnn import __version__
from charrnn.errors import DataError, DownloadError, UsageError

# Shipped inside the package (package data), so an installed wheel finds it; ./corpora/ is only where files land.
CATALOG_RESOURCE = "catalog.json"
DEFAULT_DIR = Path("corpora")
MIRROR_ENV = "CHARRNN_MIRROR"
TIMEOUT_S = 30.0  # per read: a server silent this long has stalled
CHUNK = 1 << 16
# The whole download has a deadline too, since a server trickling a byte at a time never trips the
# per-read timeout: a fixed allowance plus the catalogued size at this slowest acceptable average rate.
DEADLINE_BASE_S = 60.0
MIN_RATE_BYTES_S = 10_000

Callback = Callable[[str, dict], None]

MIRROR_HINT = (f"use --mirror DIR_OR_URL (or set {MIRROR_ENV}) to fetch from a folder or an http:// URL "
               "holding the same file names")


@dataclass(frozen=True)
class Entry:
    """One catalogued file."""

    name: str  # what `charrnn corpus get` takes
    file: str  # the file name, in ./corpora/ and on mirrors
    bytes: int
    sha256: str
    format: str  # "text", or "labeled" (label<TAB>text TSV)
    description: str
    licence: str
    citation: str
    source: str  # where this exact copy came from
    url: Optional[str] = None  # a direct download of exactly this file, or None: mirror only
    original: Optional[str] = None  # the publisher's page or archive, in its own format
    note: Optional[str] = None


@dataclass(frozen=True)
class Group:
    name: str
    description: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Catalog:
    entries: dict[str, Entry]
    groups: dict[str, Group]

    def size_of(self, group: Group) -> int:
        return sum(self.entries[m].bytes for m in group.members)


@dataclass(frozen=True)
class Fetched:
    entry: Entry
    path: Path
    status: str  # "present", "downloaded", or "replaced" (a file with another checksum was there)
    source: str  # where it came from ("" when already present)


def load_catalog(path: Path | None = None) -> Catalog:
    """The catalogue at path, or by default the one shipped in the package."""
    resource = importlib.resources.files("charrnn") / CATALOG_RESOURCE
    where = Path(path) if path else resource
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
        entries = {e["name"]: Entry(**e) for e in raw["corpora"]}
        groups = {k: Group(k, g["description"], tuple(g["members"])) for k, g in raw.get("groups", {}).items()}
    except FileNotFoundError:
        raise DataError(f"no corpus catalogue at {where}; reinstall charrnn (the catalogue ships inside the package)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"corpus catalogue {where} is unreadable ({e}); reinstall charrnn, or restore it with "
                        f"'git checkout charrnn/{CATALOG_RESOURCE}' in a clone") from None
    for g in groups.values():
        missing = [m for m in g.members if m not in entries]
        if missing:
            raise DataError(f"corpus catalogue {where}: group {g.name} names unknown corpora {missing}")
    return Catalog(entries, groups)


def resolve_names(catalog: Catalog, names: list[str]) -> list[Entry]:
    """The entries that NAMEs (corpora or groups) stand for, in order, each once."""
    out: dict[str, Entry] = {}
    for name in names:
        if name in catalog.entries:
            out.setdefault(name, catalog.entries[name])
        elif name in catalog.groups:
            for m in catalog.groups[name].members:
                out.setdefault(m, catalog.entries[m])
        else:
            known = list(catalog.entries) + list(catalog.groups)
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UsageError(f"unknown corpus '{name}'; {hint}'charrnn corpus list' shows the known ones")
    return list(out.values())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_present(entry: Entry, dest_dir: Path = DEFAULT_DIR, verify: bool = True) -> bool:
    """True when dest_dir holds this entry's file with the right size (and, with verify, checksum)."""
    p = Path(dest_dir) / entry.file
    try:
        if not p.is_file() or p.stat().st_size != entry.bytes:
            return False
    except OSError:
        return False
    return not verify or sha256_file(p) == entry.sha256


def is_url(s: str) -> bool:
    return re.match(r"^https?://", s, re.IGNORECASE) is not None


def source_for(entry: Entry, mirror: str | None = None) -> str:
    """Where to fetch entry from: the mirror (folder or base URL) if one is given, else its direct URL."""
    if mirror:
        if is_url(mirror):
            return mirror.rstrip("/") + "/" + urllib.parse.quote(entry.file)
        return str(Path(mirror).expanduser() / entry.file)
    if entry.url:
        return entry.url
    origin = f" (its publisher, {entry.original}, ships another format)" if entry.original else ""
    raise DownloadError(f"{entry.name} has no direct download{origin}; {MIRROR_HINT}")


def _open(src: str, mirror: str | None):
    """An open binary stream for src and its announced length (None when unknown)."""
    if not is_url(src):
        folder = Path(src).parent
        if not folder.is_dir():
            raise DownloadError(f"mirror folder {folder} does not exist; check --mirror or {MIRROR_ENV}")
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            raise DownloadError(f"mirror folder {folder} has no {Path(src).name}; "
                                "a mirror must hold the catalogue's file names") from None
        except OSError as e:
            raise DownloadError(f"cannot read {src}: {e.strerror}") from None
        return f, os.fstat(f.fileno()).st_size
    host = urllib.parse.urlsplit(src).netloc
    req = urllib.request.Request(src, headers={"User-Agent": f"charrnn/{__version__}"})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        where = "the mirror" if mirror else host
        raise DownloadError(f"{where} answered HTTP {e.code} {e.reason} for {src}; "
                            + ("check that the mirror holds the catalogue's file names" if mirror else MIRROR_HINT)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if mirror:
            raise DownloadError(f"cannot reach the mirror {host} ({reason}); check that it is serving and that "
                                f"--mirror or {MIRROR_ENV} names it, or point them at a folder") from None
        raise DownloadError(f"cannot reach {host} ({reason}); no network? {MIRROR_HINT}") from None
    length = resp.headers.get("Content-Length")
    return resp, int(length) if length and length.isdigit() else None


def deadline_for(entry: Entry) -> float:
    """Seconds a download of entry may take in all (see MIN_RATE_BYTES_S)."""
    return DEADLINE_BASE_S + entry.bytes / MIN_RATE_BYTES_S


def fetch(entry: Entry, dest_dir: Path = DEFAULT_DIR, mirror: str | None = None,
          callback: Callback | None = None, deadline_s: float | None = None) -> Fetched:
    """Make dest_dir/entry.file a verified copy of entry: already there, or downloaded and checked.

    The download stops with an error once it holds more than the catalogued size (it reads at most one
    chunk past it) or after deadline_s seconds in all (default: deadline_for(entry)).
    Events: "start" {name, file, bytes, source}, "progress" {name, done, total}, "end" {name, path, status}.
    """
    emit = callback or (lambda event, data: None)
    dest_dir = Path(dest_dir)
    dest = dest_dir / entry.file
    existed = dest.exists()
    if existed and is_present(entry, dest_dir):
        emit("end", {"name": entry.name, "path": str(dest), "status": "present"})
        return Fetched(entry, dest, "present", "")
    src = source_for(entry, mirror)
    limit_s = deadline_for(entry) if deadline_s is None else deadline_s
    stream, total = _open(src, mirror)  # fails before anything is written
    with stream:
        if total is not None and total > entry.bytes:
            raise DownloadError(f"{entry.file} from {src} is {total:,} bytes, the catalogue says {entry.bytes:,}; "
                                "nothing was saved; the source holds another version")
        fd, tmp = _temp_beside(dest)
        try:
            with os.fdopen(fd, "wb") as out:
                emit("start", {"name": entry.name, "file": entry.file, "bytes": entry.bytes, "source": src})
                digest, done = _copy(stream, out, entry, total, src, emit, limit_s)
                out.flush()
                os.fsync(out.fileno())
            if done != entry.bytes:
                raise DownloadError(f"{entry.file} from {src}: got {done:,} bytes, the catalogue says {entry.bytes:,}; "
                                    "nothing was saved; the source holds another version or a damaged copy")
            if digest != entry.sha256:
                raise DownloadError(f"{entry.file} from {src}: SHA-256 {digest[:16]}... does not match the catalogue's "
                                    f"{entry.sha256[:16]}...; nothing was saved; the source's copy is damaged or "
                                    "another version")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    status = "replaced" if existed else "downloaded"
    emit("end", {"name": entry.name, "path": str(dest), "status": status})
    return Fetched(entry, dest, status, src)


def _temp_beside(dest: Path) -> tuple[int, Path]:
    """A new temporary file in dest's folder (so the final rename stays on one file system)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it private; the corpus is an ordinary file
    except OSError as e:
        raise DownloadError(f"cannot write to {dest.parent}: {e.strerror}; choose another --dir") from None
    return fd, Path(name)


def _copy(stream, out, entry: Entry, total: int | None, src: str, emit: Callback,
          limit_s: float = float("inf")) -> tuple[str, int]:
    """Copy stream to out, hashing; a broken connection is an interrupted download.

    Stops with an error past the catalogued size or after limit_s seconds.
    """
    deadline = time.monotonic() + limit_s
    h = hashlib.sha256()
    done = 0
    announced, total = total, total or entry.bytes
    emit("progress", {"name": entry.name, "done": 0, "total": total})
    # read1: whatever has arrived, at most CHUNK; read(CHUNK) would wait for a whole chunk, so a
    # trickling server could hold one call far past the deadline
    read = getattr(stream, "read1", stream.read)
    try:
        for block in iter(lambda: read(CHUNK), b""):
            h.update(block)
            out.write(block)
            done += len(block)
            emit("progress", {"name": entry.name, "done": done, "total": total})
            if done > entry.bytes:
                raise DownloadError(f"{entry.file} from {src}: the source sent more than the catalogue's "
                                    f"{entry.bytes:,} bytes; stopped; nothing was saved; the source holds another "
                                    "version")
            if time.monotonic() > deadline:
                raise DownloadError(f"download of {entry.file} from {src} is too slow: {done:,} of {total:,} bytes "
                                    f"after {limit_s:g} s, its deadline; nothing was saved; try again later or use "
                                    "another --mirror")
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC: the disk, not the network
            raise DownloadError(f"disk full while writing {entry.file}; nothing was saved; free some space") from None
        _interrupted(entry, src, done, total, f" ({type(e).__name__}: {e})")
    if announced is not None and done < announced:  # http.client ends a cut-off body quietly
        _interrupted(entry, src, done, total, "")
    return h.hexdigest(), done


def _interrupted(entry: Entry, src: str, done: int, total: int, why: str):
    raise DownloadError(f"download of {entry.file} from {src} was interrupted after {done:,} of {total:,} bytes{why}; "
                        "nothing was saved; run the command again to restart it")


def fetch_all(entries: list[Entry], dest_dir: Path = DEFAULT_DIR, mirror: str | None = None,
              callback: Callback | None = None, deadline_s: float | None = None) -> list[Fetched]:
    return [fetch(e, dest_dir, mirror, callback, deadline_s) for e in entries]


def expand_corpus_args(paths: list[Path]) -> list[Path]:
    """Expand CORPUS arguments holding *, ? or [ that the shell passed through unexpanded (sorted matches).

    A name that exists as it is stays as it is, so a file whose name holds a bracket still works.
    """
    out: list[Path] = []
    for p in paths:
        s = str(p)
        if any(c in s for c in "*?[") and not p.exists():
            matches = sorted(m for m in glob.glob(os.path.expanduser(s), recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"no file matches the corpus pattern '{s}'; check the pattern and the folder "
                                f"(current folder: {Path.cwd()})")
            out.extend(Path(m) for m in matches)
        else:
            out.append(p)
    return out

