"""One writer per run folder, with real processes: the run lock, default folder names that never collide,
and the temp-file sweep that never takes a live process's file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from charrnn import checkpoint as ckm
from charrnn.config import TrainConfig
from charrnn.runfolder import default_run_dir
from conftest import TINY
from test_reliability import ckpt_files, cli, start, wait_for

LIVE = [*TINY, "--threads", "1", "--seed", "7", "--steps", "200", "--eval-every", "10"]


def charrnn_error(stderr: str) -> str:
    """The one `error:` line of a charrnn error (fails if there are more, or a traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.iterdir()}


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def live_run(tmp_path, corpus):
    """A real training process, frozen with SIGSTOP once it has saved: alive, holding its run, doing nothing."""
    run = tmp_path / "checkpoints" / "live"
    proc = start(["train", corpus, *LIVE, "--run", run], tmp_path)
    try:
        assert wait_for(lambda: ckpt_files(run), proc), proc.communicate()[1]
        proc.send_signal(signal.SIGSTOP)
        yield run, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, run: Path) -> None:
    """Let the frozen run go on: it ends normally, and every checkpoint it left is its own."""
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for p in run.glob(ckm.CKPT_GLOB):
        cfg = ckm.load(p)["train"]["config"]
        assert (cfg["seed"], cfg["hidden"]) == (7, 32), p
    assert ckm.list_checkpoints(run)[-1].step == 200


# ---------------------------------------------------------------- the run lock


def test_a_second_writer_of_a_live_run_is_refused_and_the_run_is_untouched(tmp_path, corpus, live_run):
    """`train --run SAME` and `train --resume` of a live run: one line, exit 1, nothing in the folder
    changes, and the live run goes on to its end."""
    run, proc = live_run
    before = snapshot(run)
    for args in (["train", corpus, *TINY, "--seed", "99", "--hidden", "16", "--steps", "20", "--run", run],
                 ["train", "--resume", run, "-q"]):
        r = cli(*args)
        assert r.exit_code == 1, r.output
        line = charrnn_error(r.stderr)
        assert f"{run} is being trained by process {proc.pid} (started " in line, line
        assert "wait for it to end or stop it" in line
        assert snapshot(run) == before
    finish(proc, run)


def test_a_second_train_before_the_first_save_is_refused(tmp_path, corpus):
    """The window before a run's first checkpoint: the folder already belongs to the first process."""
    run = tmp_path / "run"
    first = start(["train", corpus, *LIVE, "--run", run], tmp_path)
    assert wait_for(lambda: (run / ".lock").exists() and str(first.pid) in (run / ".lock").read_text(), first)
    first.send_signal(signal.SIGSTOP)  # before or after its first save: either way it is alive
    try:
        second = start(["train", corpus, *TINY, "--steps", "20", "--seed", "99", "--hidden", "16", "--run", run], tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1
        assert f"is being trained by process {first.pid}" in charrnn_error(err)
    finally:
        first.send_signal(signal.SIGCONT)
    finish(first, run)


def test_a_killed_run_leaves_no_stale_lock(tmp_path, corpus):
    run = tmp_path / "run"
    proc = start(["train", corpus, *LIVE, "--run", run], tmp_path)
    assert wait_for(lambda: ckpt_files(run), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert str(proc.pid) in (run / ".lock").read_text()  # its lock file stays; its lock went with it
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 0, r.output
    assert ckm.list_checkpoints(run)[-1].step == 200


def test_prune_leaves_a_live_run_alone_and_says_so(tmp_path, corpus, live_run):
    run, proc = live_run
    done = tmp_path / "checkpoints" / "done"
    assert cli("train", corpus, *TINY, "--steps", "12", "--eval-every", "2", "--keep", "5", "--run", done).exit_code == 0
    (done / f".step_00000099.pt.tmp{dead_pid()}").write_bytes(b"half a save")
    before = snapshot(run)
    r = cli("checkpoints", "prune", "--keep", "1")
    assert r.exit_code == 0, r.output
    skipped = [l for l in r.stderr.splitlines() if l.startswith("skipped")]
    assert len(skipped) == 1, r.stderr
    assert skipped[0].startswith(f"skipped: checkpoints/live is being trained by process {proc.pid} (started ")
    assert skipped[0].endswith("; prune it when that ends")
    assert "checkpoint(s) in 1 run(s)" in r.stderr, r.stderr
    assert len(ckpt_files(done)) <= 2 and not list(done.glob(".*.tmp*"))  # the other run was pruned
    assert snapshot(run) == before
    finish(proc, run)


# ---------------------------------------------------------------- run folder names


def test_default_run_folders_never_collide(tmp_path):
    """Many runs choosing a name at the same moment (the names have one-second resolution) each get their own."""
    cfg = TrainConfig(cell="lstm", layers=1, hidden=32)
    n = 8
    gate = threading.Barrier(n)
    got: list[Path] = []

    def pick():
        gate.wait()
        got.append(default_run_dir(tmp_path / "checkpoints", [Path("c.txt")], cfg))

    threads = [threading.Thread(target=pick) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == n and all(p.is_dir() and not any(p.iterdir()) for p in got)


def test_three_runs_started_at_once_get_three_folders(tmp_path, corpus):
    procs = [start(["train", corpus, *TINY, "--threads", "1", "--steps", "8", "--seed", seed], tmp_path)
             for seed in (1, 2, 3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = sorted((tmp_path / "checkpoints").iterdir())
    assert len(runs) == 3, runs
    seeds = []
    for run in runs:
        run_seeds = {ckm.load(p)["train"]["config"]["seed"] for p in run.glob(ckm.CKPT_GLOB)}
        assert len(run_seeds) == 1, (run, run_seeds)  # one run per folder
        seeds += run_seeds
    assert sorted(seeds) == [1, 2, 3]


def test_a_run_that_fails_to_start_leaves_no_empty_folder(tmp_path, corpus):
    r = cli("train", corpus, *TINY, "--steps", "5", "--sentiment-unit")  # a plain corpus has no labels
    assert r.exit_code != 0
    assert not (tmp_path / "checkpoints").is_dir() or not any((tmp_path / "checkpoints").iterdir())


# ---------------------------------------------------------------- the temp-file sweep


def test_sweep_keeps_a_live_writers_temp_file_and_removes_dead_ones(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen(["sleep", "300"])
    try:
        kept = run / f".step_00000008.pt.tmp{live.pid}"
        dead = run / f".step_00000012.pt.tmp{dead_pid()}"
        recycled = run / f".step_00000016.json.tmp{live.pid}"  # written before that process began: its pid was reused
        for p in (kept, dead, recycled):
            p.write_bytes(b"part of a save")
        old = time.time() - 3600
        os.utime(recycled, (old, old))
        foreign = run / ".notes.tmp"  # no pid: not a charrnn file
        foreign.write_text("x")
        ckm.clean_temp_files(run)
        assert kept.exists() and foreign.exists()
        assert not dead.exists()
        if sys.platform == "linux":  # where /proc tells when a process started
            assert not recycled.exists()
    finally:
        live.kill()
        live.wait()
    ckm.clean_temp_files(run)
    assert not kept.exists()  # its writer is gone now
