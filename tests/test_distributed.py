"""torchrun with 2 processes on this machine (gloo, loopback): one model, one run folder, same maths as 1 process."""

import json
import os
import subprocess
import sys

import pytest

from conftest import make_text, run_cli

pytestmark = pytest.mark.slow

ARGS = ["--hidden", "48", "--layers", "1", "--seq-len", "24", "--batch-size", "8", "--seed", "3", "-q"]


def torchrun(*args, nproc=2, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "charrnn", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


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
    assert s.exit_code == 0 and len(s.stdout) == 1 + 40 + 1  # default prime "\n", 40 characters, final newline


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
