"""Who owns a run folder or a temporary file: the run lock, and the test for a dead writer's leftovers.

A run folder has one writer at a time: the process holding `RUN/.lock` with `flock`. The kernel
drops an flock when its process ends however it ends (SIGKILL, power loss of the process), so a
lock is never stale; the pid and start time written into the file only serve the message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from charrnn.errors import CheckpointError

LOCK_NAME = ".lock"
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # what flock says where a file system has no locks


def _when(t: float) -> str:
    """A start time as people say it: 15:42 today, else with the date."""
    lt = time.localtime(t)
    return time.strftime("%H:%M" if lt[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", lt)


def _describe(run_dir: Path, fd: int) -> str:
    """'RUN is being trained by process 1234 (started 15:42)', from what the holder wrote in the lock file."""
    try:
        meta = json.loads(os.pread(fd, 4096, 0).decode())
        pid, started, command = int(meta["pid"]), float(meta["started"]), str(meta["command"])
        host = meta.get("host")
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return f"{run_dir} is in use by another charrnn process"
    here = not host or host == socket.gethostname()
    if here and not _pid_exists(pid):  # the lock was taken a moment ago by one that has not written yet
        return f"{run_dir} is in use by another charrnn process"
    where = "" if here else f" on {host}"
    doing = "being trained" if command == "train" else f"in use ({command})"
    return f"{run_dir} is {doing} by process {pid}{where} (started {_when(started)})"


class RunLock:
    """The exclusive lock on a run folder, held from `acquire` until `release` (or the process ends)."""

    def __init__(self, run_dir: Path, command: str = "train"):
        self.run_dir, self.command = Path(run_dir), command
        self.fd: int | None = None
        self.supported = True  # False on a file system without file locks (some FUSE and NFS set-ups)

    def try_acquire(self) -> str | None:
        """Take the lock; None when taken, else who holds it (one line). Creates the folder if needed."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            writable = True
        except OSError as e:
            # a read-only folder: an existing lock file can still be locked (flock needs no write
            # access), so a second reader is kept out; the run's own writes then fail with the reason
            if e.errno not in (errno.EROFS, errno.EACCES) or not path.exists():
                raise
            fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.run_dir, fd)
            os.close(fd)
            return holder
        except OSError as e:
            if e.errno not in NO_LOCKS:
                os.close(fd)
                raise
            self.supported = False  # go on unguarded rather than refuse to train at all
        if writable:
            meta = {"pid": os.getpid(), "started": time.time(), "command": self.command, "host": socket.gethostname()}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(meta) + "\n").encode(), 0)
            except OSError:
                pass  # a full disk: the lock holds all the same, the message will be vaguer
        self.fd = fd
        return None

    def acquire(self) -> "RunLock":
        """Take the lock or raise CheckpointError saying who holds it; disk problems become CheckpointError too."""
        try:
            holder = self.try_acquire()
        except OSError as e:
            raise CheckpointError(
                f"cannot write to {self.run_dir}: {e.strerror or e}; make it writable or choose another folder"
            ) from None
        if holder is not None:
            raise CheckpointError(f"{holder}; wait for it to end or stop it, then run the command again")
        return self

    def release(self) -> None:
        """Let go of the lock. The file stays: removing it would let two processes lock two different files."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass  # at interpreter shutdown: the process's end drops the lock anyway


def holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock (one line), or None when no live process does. Creates nothing."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no charrnn process has it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(Path(run_dir), fd)
    except OSError:
        return None  # a file system without locks: the real acquire will say
    finally:
        os.close(fd)  # also drops the shared lock just taken


def check_free(run_dir: Path) -> None:
    """Raise CheckpointError when a live process holds the run folder (a quick test before any work)."""
    who = holder(run_dir)
    if who is not None:
        raise CheckpointError(f"{who}; wait for it to end or stop it, then run the command again")


# ---------------------------------------------------------------- leftovers of dead writers


def _start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    if fields[0] == "Z":
        return float("inf")  # a zombie writes nothing more: as good as dead
    return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False  # 0 and below name process groups, never a writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    except OverflowError:
        return False  # no process can have such a pid
    return True


def writer_alive(pid: int, last_write: float) -> bool:
    """Could process `pid` still be writing a file it last wrote at `last_write` (its mtime)?

    Errs on the side of yes, so a live writer's file is never taken away. A pid no longer in use is
    dead. A pid in use by a process that started after the file was last written is a new process
    that got a recycled pid, so the writer is dead (where /proc tells start times; elsewhere such a
    file waits until that pid is free). One second of slack covers the clocks' rounding.
    """
    if pid == os.getpid():
        return True
    if not _pid_exists(pid):
        return False
    started = _start_time(pid)
    return started is None or started <= last_write + 1.0


def temp_pid(path: Path) -> int | None:
    """The writer's pid in a temporary file name `NAME.tmpPID` (as charrnn writes them), else None."""
    _, sep, tail = Path(path).name.rpartition(".tmp")
    return int(tail) if sep and tail.isdigit() else None


def is_stale_temp(path: Path) -> bool:
    """True for a charrnn temporary file whose writer is dead: safe to delete. False for anything else."""
    pid = temp_pid(path)
    if pid is None:
        return False
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        return False  # already gone
    return not writer_alive(pid, mtime)
