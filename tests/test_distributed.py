"""torchrun with 2 processes on this machine (gloo, loopback): one model, one run folder, same maths as 1
process; and a failure on one process (disk full, SIGKILL) ends the whole job quickly with one clear line."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charrnn import checkpoint as ckm
from conftest import make_text, run_cli

pytestmark = pytest.mark.slow

ARGS = ["--hidden", "48", "--layers", "1", "--seq-len", "24", "--batch-size", "8", "--seed", "3", "-q"]


def torchrun(*args, nproc=2, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "charrnn", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def start_torchrun(*args, nproc=2):
    """torchrun in the background (a real launcher with its worker processes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "charrnn", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (children of the launcher, each in its own session)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile, or not ours to read
        rank = [e[5:] for e in environ if e.startswith(b"RANK=")]
        if ppid == launcher.pid and rank:
            found[int(rank[0])] = int(proc.name)
    return found


def stop(launcher: subprocess.Popen, pids: dict[int, int]) -> None:
    """Kill what is left of the job: torchrun starts its workers in sessions of their own, so a test
    that failed must end them by pid, or they train on (and hang) after it."""
    for pid in [*pids.values(), launcher.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.communicate()


def wait_for_checkpoint(run: Path, launcher: subprocess.Popen, timeout: float = 180) -> Path:
    """The first checkpoint file of the run: the training loop is running on every process."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(run.glob(ckm.CKPT_GLOB))
        if found:
            return found[0]
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("torchrun saved no checkpoint in time")


def finish(launcher: subprocess.Popen, pids: dict[int, int], limit: float) -> tuple[float, str]:
    """Wait for the whole job to end (killing it if it outlives `limit`); seconds it took, and stderr."""
    t0 = time.monotonic()
    try:
        _, err = launcher.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stop(launcher, pids)
        raise AssertionError(f"the torchrun job was still running {limit:.0f} s after the failure") from None
    return time.monotonic() - t0, err


def charrnn_errors(err: str) -> list[str]:
    """charrnn's own error lines in a torchrun job's stderr (the launcher adds its own report around them)."""
    assert not re.search(r'File ".*charrnn[/\\]', err), err[-3000:]  # no traceback through charrnn's code
    return [line for line in err.splitlines() if line.startswith("error: ")]


LONG = [*ARGS, "--steps", "100000", "--eval-every", "10", "--keep", "5"]


def test_disk_full_on_rank_0_ends_the_job_with_one_line(text, tmp_path):
    """RLIMIT_FSIZE lowered on rank 0 (prlimit, as in test_reliability's disk-full test) makes its next
    checkpoint write fail for real (EFBIG); rank 0 says so in one line and the whole job ends, promptly."""
    run = tmp_path / "run"
    job, pids = start_torchrun("train", text, *LONG, "--run-dir", run), {}
    try:
        first = wait_for_checkpoint(run, job)
        pids = workers(job)
        resource.prlimit(pids[0], resource.RLIMIT_FSIZE, (first.stat().st_size // 2, resource.RLIM_INFINITY))
        took, err = finish(job, pids, 60)
    finally:
        if job.poll() is None:  # the test failed with the job still running (torchrun outlives its workers)
            stop(job, pids or workers(job))
    assert job.returncode != 0
    lines = charrnn_errors(err)
    disk = [l for l in lines if "could not write checkpoint" in l]
    assert len(disk) == 1 and "File too large" in disk[0] and f"charrnn train --resume {run}" in disk[0], err[-3000:]
    assert all("lost contact" in l for l in lines if l not in disk), lines  # rank 1, if it had time to speak
    assert ckm.list_checkpoints(run) and all(ckm.load(i.path) for i in ckm.list_checkpoints(run))
    print(f"\njob ended {took:.1f} s after the limit was lowered")


def test_killed_rank_ends_the_job_with_one_line_from_rank_0(text, tmp_path):
    """SIGKILL on rank 1 mid-run: rank 0 notices (its next collective fails), says so in one line with
    the resume command, and the whole job ends promptly instead of waiting for a peer that is gone."""
    run = tmp_path / "run"
    job, pids = start_torchrun("train", text, *LONG, "--run-dir", run), {}
    try:
        wait_for_checkpoint(run, job)
        pids = workers(job)
        os.kill(pids[1], signal.SIGKILL)
        took, err = finish(job, pids, 60)
    finally:
        if job.poll() is None:  # the test failed with the job still running (torchrun outlives its workers)
            stop(job, pids or workers(job))
    assert job.returncode != 0
    lines = charrnn_errors(err)
    assert len(lines) == 1, err[-3000:]
    assert "process 0 of 2 lost contact" in lines[0] and f"charrnn train --resume {run}" in lines[0], lines
    assert all(ckm.load(i.path) for i in ckm.list_checkpoints(run))
    print(f"\njob ended {took:.1f} s after the kill")


def evals(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in json.loads(l)]


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(make_text(30_000, seed=4))
    return p


def test_two_processes_train_one_model_like_one_process(text, tmp_path):
    r = torchrun("train", text, *ARGS, "--steps", "60", "--eval-every", "20", "--run-dir", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = [p for p in (tmp_path).iterdir() if p.is_dir() and (p / "metrics.jsonl").exists()]
    assert [p.name for p in runs] == ["two"]
    two = evals(tmp_path / "two")
    assert [e["step"] for e in two] == [20, 40, 60]
    assert two[-1]["val_loss"] < two[0]["val_loss"]
    # the same run in one process, same total batch: the same maths up to float rounding
    one_r = subprocess.run([sys.executable, "-m", "charrnn", "train", str(text), *ARGS, "--steps", "60",
                            "--eval-every", "20", "--run", str(tmp_path / "one"), "--threads", "1"],
                           capture_output=True, text=True)
    assert one_r.returncode == 0, one_r.stderr
    one = evals(tmp_path / "one")
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) < 0.02
    # a checkpoint written by torchrun samples in a single process
    s = run_cli("sample", tmp_path / "two", "--length", "40", "--seed", "1")
    assert s.exit_code == 0 and len(s.stdout) == 40 + 1  # 40 characters (the default prime is not echoed), final newline


def test_distributed_run_resumes_with_another_process_count(text, tmp_path):
    run = tmp_path / "run"
    r = torchrun("train", text, *ARGS, "--steps", "40", "--eval-every", "20", "--keep", "5", "--run-dir", run)
    assert r.returncode == 0, r.stderr[-2000:]
    full = evals(run)[-1]["val_loss"]
    # drop the last checkpoint, then continue in a single process
    from charrnn import checkpoint as ckm

    last = ckm.list_checkpoints(run)[-1]
    assert last.step == 40
    last.path.unlink()
    ckm.sidecar(last.path).unlink()
    res = run_cli("train", "--resume", run, "--threads", "1", "-q")
    assert res.exit_code == 0, res.stderr
    assert evals(run)[-1]["step"] == 40
    assert abs(evals(run)[-1]["val_loss"] - full) < 0.02


def test_batch_must_split_over_processes(text, tmp_path):
    r = torchrun("train", text, *ARGS[:-3], "--batch-size", "7", "--steps", "5", "--run-dir", tmp_path / "odd", timeout=120)
    assert r.returncode != 0
    assert "does not split evenly" in r.stderr
