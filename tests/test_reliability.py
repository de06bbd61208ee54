"""Reliability, tested by doing the damage for real: SIGKILL/SIGINT/SIGTERM during training, full and
read-only disks, NaN and exploding losses, hostile or broken checkpoint files, and bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charrnn import checkpoint as ckm
from charrnn.cli import app
from conftest import TINY, make_text, run_cli

STEPS, EVAL_EVERY = 500, 4  # a save every 4 steps, so kills land during saves too
# fp32 pinned: with auto, a CPU with native bf16 times both precisions at the start of each new run, and the
# baseline and the killed run (started side by side) could choose differently and so differ by ~1e-5
TRAIN_ARGS = [*TINY, "--threads", "1", "--seed", "7", "--keep", "2", "--steps", str(STEPS),
              "--eval-every", str(EVAL_EVERY), "--precision", "fp32"]


# ---------------------------------------------------------------- helpers


def cli(*args, env: dict | None = None):
    """The CLI in-process; exceptions are caught so a crash shows up as a failed assertion, not an error."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"crashed: {result.exception!r}\n{result.output}")
    return result


def error_line(result) -> str:
    """The single line of a charrnn error on stderr (fails if there is more than one line)."""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    return lines[0]


def start(args, cwd: Path) -> subprocess.Popen:
    """A real `python -m charrnn` process."""
    env = {**os.environ, "CHARRNN_CACHE": str(cwd / ".cache")}
    return subprocess.Popen([sys.executable, "-m", "charrnn", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ckpt_files(run: Path) -> set[str]:
    return {p.name for p in run.glob(ckm.CKPT_GLOB)} if run.is_dir() else set()


def temp_files(run: Path) -> list[Path]:
    return list(run.glob(".*.tmp*")) if run.is_dir() else []


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.005) -> bool:
    """Poll `cond()` until it holds (True) or the process ends first (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training process")


def check_all_load(run: Path) -> int:
    """Every checkpoint file on disk loads and holds finite weights; returns how many there are."""
    files = sorted(run.glob(ckm.CKPT_GLOB))
    for p in files:
        ck = ckm.load(p)
        assert all(torch.isfinite(v).all() for v in ck["model"].values()), p
    return len(files)


def newest_step(run: Path) -> int:
    return max((int(n[5:13]) for n in ckpt_files(run)), default=-1)


def metrics(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- crash safety


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_last_save_does_not_kill_a_finished_run(tmp_path, sig):
    """Python restores the default handlers while it shuts down; a Ctrl-C landing there once ended a
    completed run with -2 and nothing printed. Now the finished run exits 0 whenever the signal comes."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20_000))
    run = tmp_path / "run"
    codes = []
    for delay in (0.0, 0.03, 0.08):
        shutil.rmtree(run, ignore_errors=True)
        proc = start(["train", corpus, *TINY, "--threads", "1", "--steps", "40", "--eval-every", "4", "--run", run], tmp_path)
        wait_for(lambda: (run / ckm.ckpt_name(40)).exists(), proc, poll=0.0005)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        codes.append(proc.returncode)
        assert ckm.load(run / ckm.ckpt_name(40))["train"]["step"] == 40
    assert all(c == 0 or c == (130 if sig == signal.SIGINT else 143) for c in codes), codes


def progress_beyond(run: Path, proc: subprocess.Popen, rng: random.Random) -> None:
    """Wait until the run has saved 1 to 3 more checkpoints, then a few random milliseconds more: a
    moment anywhere in the step/save cycle, set by the run's own progress, not by the wall clock,
    so that a fast machine does not finish the run before the kills are done, nor a slow one kill
    it before it got anywhere."""
    target = newest_step(run) + EVAL_EVERY * rng.randint(1, 3)
    wait_for(lambda: newest_step(run) >= target, proc)
    time.sleep(rng.uniform(0.0, 0.02))


def saving(run: Path, proc: subprocess.Popen) -> list[Path]:
    """This process's checkpoint temp files: a save it has begun and not finished (a killed process's
    leftovers, which the next resume clears, carry another pid)."""
    return list(run.glob(f".step_*.tmp{proc.pid}"))


def stop_during_save(run: Path, proc: subprocess.Popen, tries: int = 25) -> bool:
    """Freeze the process (SIGSTOP) while a checkpoint's temp file is on disk, so that the SIGKILL that
    follows lands inside that save for sure; a save that finished between seeing its temp file and
    the freeze is let go (SIGCONT) and the next one is tried. False if the process ended first."""
    for _ in range(tries):
        if not wait_for(lambda: saving(run, proc), proc, poll=0.0002):
            return False
        proc.send_signal(signal.SIGSTOP)
        if saving(run, proc):
            return True
        proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"{tries} saves each finished before the process could be stopped inside one")


@pytest.mark.slow
def test_sigkill_sigint_sigterm_lose_nothing_and_resume_exactly(tmp_path):
    """Real training processes killed at random moments (and in the middle of saves), then interrupted
    with SIGINT and SIGTERM; the resumed run ends exactly where an uninterrupted one does.

    Every moment is an event of the run (a new checkpoint, a save's temp file), never a fixed sleep,
    so each kill happens on a loaded machine as on an idle one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20_000))
    run, base = tmp_path / "run", tmp_path / "base"
    baseline = start(["train", corpus, *TRAIN_ARGS, "--run", base], tmp_path)
    rng = random.Random(int(os.environ.get("CHARRNN_KILL_SEED", "5")))
    moments = ["random", "save", "startup", "random", "save", "random", "save", "random", "SIGINT", "SIGTERM"]
    kills = during_save = files_checked = 0
    finished = False
    for moment in moments:
        args = ["train", "--resume", run, "-q"] if ckpt_files(run) else ["train", corpus, *TRAIN_ARGS, "--run", run]
        before = ckpt_files(run)
        prev_newest = newest_step(run)
        proc = start(args, tmp_path)
        if moment == "startup":  # while importing, reading the corpus or truncating metrics: before its first save
            deadline = time.monotonic() + rng.uniform(0.05, 1.5)
            wait_for(lambda: time.monotonic() >= deadline or ckpt_files(run) - before, proc)
        elif not wait_for(lambda: ckpt_files(run) - before, proc):  # the loop is running: it saved
            finished = True
        if not finished and moment in ("random", "SIGINT", "SIGTERM"):
            progress_beyond(run, proc, rng)
        elif not finished and moment == "save":
            finished = not stop_during_save(run, proc)
        if proc.poll() is not None:  # it finished before this moment came
            assert proc.wait() == 0, proc.stderr.read()
            finished = True
            break
        if moment in ("SIGINT", "SIGTERM"):
            proc.send_signal(getattr(signal, moment))
            out, err = proc.communicate(timeout=120)
            if proc.returncode == 0:
                finished = True  # the signal came after the last step: the run simply completed
                break
            assert proc.returncode == (130 if moment == "SIGINT" else 143), err
            assert "Traceback" not in err
            assert f"charrnn train --resume {run}" in err, err
            saved = Path(err.split("saved ")[1].split(". ")[0])
            assert saved.exists() and ckm.load(saved)["train"]["step"] == newest_step(run)
        else:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            kills += 1
            during_save += bool(saving(run, proc))
        files_checked += check_all_load(run)
        # nothing lost: the newest checkpoint never goes back, and at most one save interval is redone
        assert newest_step(run) >= prev_newest
        if moment != "startup" and (run / "metrics.jsonl").exists():
            evals = [m["step"] for m in metrics(run) if "val_loss" in m]
            assert newest_step(run) >= max(evals, default=0) - EVAL_EVERY
    if not finished:
        proc = start(["train", "--resume", run, "-q"], tmp_path)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert baseline.wait(timeout=300) == 0, baseline.stderr.read()
    assert not temp_files(run)
    print(f"\n{kills} SIGKILLs ({during_save} during a save), SIGINT, SIGTERM; {files_checked} checkpoint loads")
    assert kills == 8 and during_save >= 3, (kills, during_save)  # every moment came, each save moment inside a save

    # the same final step and the same validation losses, step for step, as the uninterrupted run
    final, final_base = ckm.load(run / ckm.ckpt_name(STEPS)), ckm.load(base / ckm.ckpt_name(STEPS))
    assert final["train"]["step"] == final_base["train"]["step"] == STEPS
    assert final["train"]["state"]["precision"] == final_base["train"]["state"]["precision"] == "fp32"
    assert abs(final["val_loss"] - final_base["val_loss"]) < 1e-6
    ev = [(m["step"], m["val_loss"]) for m in metrics(run) if "val_loss" in m]
    ev_base = [(m["step"], m["val_loss"]) for m in metrics(base) if "val_loss" in m]
    assert [s for s, _ in ev] == [s for s, _ in ev_base]  # metrics.jsonl has no repeated or missing steps
    assert max(abs(a - b) for (_, a), (_, b) in zip(ev, ev_base)) < 1e-6
    losses = [(m["step"], m["loss"]) for m in metrics(run) if "loss" in m]
    assert losses == [(m["step"], m["loss"]) for m in metrics(base) if "loss" in m]


def test_resume_uses_newest_readable_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    assert run_cli("train", corpus, *TINY, "--steps", "24", "--eval-every", "8", "--keep", "3", "--run", run).exit_code == 0
    newest = run / ckm.ckpt_name(24)
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged on disk after the fact
    ckm.sidecar(newest).unlink()
    killed = subprocess.Popen(["true"])
    killed.wait()  # a writer that is gone: the sweep keeps the files of live ones
    (run / f".{ckm.ckpt_name(32)}.tmp{killed.pid}").write_bytes(b"half a save")
    (run / "step_00000004.json").write_text("{}")  # a killed rotation deleted the checkpoint, not its sidecar
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 0, r.output
    assert not temp_files(run) and not (run / "step_00000004.json").exists()
    assert ckm.load(run / ckm.ckpt_name(24))["train"]["step"] == 24  # redone from step 16


# ---------------------------------------------------------------- never worse


def test_best_only_replaced_by_better_and_files_never_rewritten(tmp_path, corpus):
    from charrnn.config import TrainConfig
    from charrnn.events import TrainEvents
    from charrnn.train import Trainer

    run = tmp_path / "run"
    seen: dict[str, str] = {}
    vals: list[float] = []
    not_best = 0

    class Check(TrainEvents):
        def on_eval(self, e):
            nonlocal not_best
            vals.append(e.val_loss)
            not_best += not e.best

        def on_save(self, e):
            for p in run.glob(ckm.CKPT_GLOB):
                assert seen.setdefault(p.name, digest(p)) == digest(p), f"{p.name} was rewritten"
            infos = ckm.list_checkpoints(run)
            assert len(infos) <= 2  # --keep 1: the best and the newest
            assert ckm.best_of(infos).val_loss == min(vals)

    cfg = TrainConfig(hidden=32, layers=1, seq_len=16, batch_size=8, steps=60, eval_every=2, keep=1,
                      lr=0.3, warmup_steps=0, threads=1)
    Trainer.new([corpus], cfg, run_dir=run, callback=Check()).run()
    assert not_best > 0, "the run never got worse, so the test proved nothing"
    assert ckm.best_of(ckm.list_checkpoints(run)).val_loss == min(vals)


def test_rotate_keeps_best_and_newest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step, val in [(10, 2.0), (20, 1.5), (30, 1.8), (40, 1.4), (50, 1.9), (60, 2.5)]:
        path = run / ckm.ckpt_name(step)
        ckm.save(path, {"train": {"step": step}, "val_loss": val, "w": torch.zeros(4)})
        ckm.write_sidecar(path, step, val)
        ckm.rotate(run, keep=2)
    assert sorted(ckpt_files(run)) == [ckm.ckpt_name(40), ckm.ckpt_name(50), ckm.ckpt_name(60)]
    assert ckm.best_of(ckm.list_checkpoints(run)).step == 40


def test_disk_full_keeps_last_good_checkpoint(tmp_path):
    """RLIMIT_FSIZE, lowered on the running process with prlimit, makes its next checkpoint write fail
    with EFBIG ("File too large"): a real failed write, as on a full disk, which root cannot bypass."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20_000))
    run = tmp_path / "run"
    proc = start(["train", corpus, *TRAIN_ARGS, "--run", run], tmp_path)
    assert wait_for(lambda: ckpt_files(run), proc)
    size = min(p.stat().st_size for p in run.glob(ckm.CKPT_GLOB))
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "could not write checkpoint" in lines[0] and "File too large" in lines[0], err
    assert f"charrnn train --resume {run}" in lines[0]
    assert check_all_load(run) >= 1 and not temp_files(run)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount")
def test_full_and_read_only_filesystem(tmp_path, corpus):
    """A small tmpfs fills up for real (ENOSPC), then is remounted read-only (EROFS)."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "600k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        run = mnt / "run"
        r = cli("train", corpus, *TINY, "--steps", "200", "--eval-every", "2", "--keep", "100", "--run", run)
        assert r.exit_code == 1
        assert "No space left on device" in error_line(r), r.stderr
        n = check_all_load(run)
        assert n >= 2 and not temp_files(run)
        hashes = {p.name: digest(p) for p in run.glob(ckm.CKPT_GLOB)}
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        r = cli("train", "--resume", run, "-q")
        assert r.exit_code == 1
        assert "Read-only file system" in error_line(r) and "cannot resume" in error_line(r)
        assert {p.name: digest(p) for p in run.glob(ckm.CKPT_GLOB)} == hashes
        r = cli("train", corpus, *TINY, "--steps", "10", "--run", mnt / "new")
        assert r.exit_code == 1 and "Read-only file system" in error_line(r)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_keep_and_prune_bound_disk(tmp_path, corpus):
    run = tmp_path / "checkpoints" / "run"
    assert run_cli("train", corpus, *TINY, "--steps", "40", "--eval-every", "2", "--keep", "3", "--run", run).exit_code == 0
    assert 3 <= len(ckpt_files(run)) <= 4  # the 3 newest and the best
    r = cli("checkpoints", "prune", "--keep", "1", "--dir", "checkpoints")
    assert r.exit_code == 0, r.output
    infos = ckm.list_checkpoints(run)
    assert 1 <= len(infos) <= 2 and infos[-1].step == 40
    assert ckm.best_of(infos).val_loss == min(m["val_loss"] for m in metrics(run) if "val_loss" in m)


# ---------------------------------------------------------------- NaN and explosion


def test_injected_nan_rolls_back_and_recovers(tmp_path, corpus):
    run = tmp_path / "run"
    r = cli("train", corpus, *TINY, "--steps", "60", "--eval-every", "10", "--run", run,
            env={"CHARRNN_TEST_NAN_AT": "25"})
    assert r.exit_code == 0, r.output
    assert "step 25: non-finite loss, step skipped" in r.stderr
    assert "rolled back to step 20" in r.stderr and "halved the learning rate" in r.stderr
    final = ckm.load(run / ckm.ckpt_name(60))
    assert math.isfinite(final["val_loss"]) and final["train"]["state"]["lr_scale"] == 0.5
    check_all_load(run)


def test_nan_that_keeps_coming_back_stops_with_good_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    r = cli("train", corpus, *TINY, "--steps", "60", "--eval-every", "10", "--run", run,
            env={"CHARRNN_TEST_NAN_AT": "25+"})
    assert r.exit_code == 1
    line = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "training diverged" in line[0] and ckm.ckpt_name(20) in line[0], r.stderr
    assert r.stderr.count("rolled back to step 20") == 4
    assert check_all_load(run) >= 1 and newest_step(run) == 20


def test_absurd_learning_rate_explodes_and_stops_cleanly(tmp_path, corpus):
    run = tmp_path / "run"
    r = cli("train", corpus, *TINY, "--steps", "60", "--lr", "1e6", "--grad-clip", "0", "--run", run)
    assert r.exit_code == 1
    assert "exploding loss" in r.stderr and "halved the learning rate" in r.stderr
    assert "training diverged" in r.stderr.splitlines()[-1] and "--grad-clip 1" in r.stderr.splitlines()[-1]
    assert check_all_load(run) == 1  # the last good state, step 0, so the run can be restarted from it


# ---------------------------------------------------------------- safe loading


class _Plant:
    """Unpickling this creates a file: what a hostile checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run, shared by the loading and bad-input tests."""
    d = tmp_path_factory.mktemp("trained")
    (d / "corpus.txt").write_text(make_text(20_000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE", str(d / ".cache"))
        torch.set_num_threads(1)
        r = run_cli("train", d / "corpus.txt", *TINY, "--steps", "20", "--eval-every", "10", "--run", d / "run")
    assert r.exit_code == 0, r.output
    return d / "run"


def test_hostile_and_broken_checkpoints_are_refused(tmp_path, trained, corpus):
    good = trained / ckm.ckpt_name(20)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckm.FORMAT, "format_version": ckm.FORMAT_VERSION, "x": _Plant(marker)}, evil)
    # the plant is real: loaded the unsafe way, it runs its code
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    raw = tmp_path / "evil_raw.pt"
    import pickle

    raw.write_bytes(pickle.dumps(_Plant(marker)))
    files = {
        "evil.pt": (evil, "refused to load"),
        "evil_raw.pt": (raw, "not a PyTorch zip archive"),  # refused before unpickling
        "text.pt": ("hello, I am not a checkpoint\n", "not a charrnn checkpoint"),
        "empty.pt": ("", "not a charrnn checkpoint"),
        "truncated.pt": (good.read_bytes()[: good.stat().st_size // 2], "truncated or damaged"),
        "foreign.pt": ({"model": torch.zeros(3)}, "no charrnn format marker"),
        "future.pt": ({**ckm.load(good), "format_version": 99}, "format 99"),
    }
    for name, (content, _) in files.items():
        path = tmp_path / name
        if isinstance(content, dict):
            torch.save(content, path)
        elif isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
    tried = 0
    for name, (_, fragment) in files.items():
        path = tmp_path / name
        for args in (["sample", path, "--length", "5"], ["eval", path, corpus], ["checkpoints", "show", path],
                     ["train", corpus, *TINY, "--steps", "5", "--init-from", path, "--run", tmp_path / "ft"]):
            r = cli(*args)
            assert r.exit_code == 1, (name, args, r.output)
            assert fragment in error_line(r), (name, r.stderr)
            tried += 1
    assert not marker.exists()
    assert not (tmp_path / "ft").exists()
    # a run whose only checkpoint is hostile cannot be resumed, and nothing runs
    run = tmp_path / "evilrun"
    run.mkdir()
    shutil.copy(evil, run / ckm.ckpt_name(10))
    r = cli("train", "--resume", run)
    assert r.exit_code == 1 and "cannot resume" in error_line(r)
    assert not marker.exists()
    print(f"\n{len(files)} hostile or broken files, {tried} loads refused")


# ---------------------------------------------------------------- bad input

BAD = {  # name -> content of the file written in the test folder
    "empty.txt": b"",
    "binary.dat": bytes(range(256)) * 8,
    "latin1.txt": b"good text\n" * 120 + b"caf\xe9\n" + b"more\n" * 10,  # bad byte at offset 1203
    "short.txt": b"too short\n" * 3,
    "bad_label.tsv": b"label\ttext\n1\tfine\nmaybe\tnot a label\n",
    "no_tab.tsv": b"label\ttext\n1\tfine\n0 no tab here\n",
    "unknown_chars.txt": "z\u00e9bre \u2603 \u00fc\n".encode() * 200,
}

RUN = "{RUN}"  # stands for the trained run folder
T = ["--hidden", "16", "--layers", "1", "--seq-len", "8", "--batch-size", "4", "--steps", "5"]

CASES = [  # (id, args, exit code, fragment of stderr)
    ("missing file", ["train", "nope.txt", *T], 1, "corpus file not found: nope.txt"),
    ("a folder", ["train", "adir", *T], 1, "is a folder"),
    ("empty file", ["train", "empty.txt", *T], 1, "corpus file is empty"),
    ("binary file", ["train", "binary.dat", *T], 1, "looks like a binary file"),
    ("invalid utf-8", ["train", "latin1.txt", *T], 1, "offset 1203); fix the file or pass --encoding-errors replace"),
    ("shorter than a batch", ["train", "short.txt", *T], 1, "fewer than one batch needs"),
    ("tsv bad label", ["train", "bad_label.tsv", *T], 1, "bad_label.tsv:3: unknown label"),
    ("tsv no tab", ["train", "no_tab.tsv", *T], 1, "no_tab.tsv:3: malformed row"),
    ("hidden 0", ["train", "corpus.txt", *T, "--hidden", "0"], 2, "--hidden"),
    ("layers -1", ["train", "corpus.txt", *T, "--layers", "-1"], 2, "--layers"),
    ("batch-size 0", ["train", "corpus.txt", *T, "--batch-size", "0"], 2, "--batch-size"),
    ("seq-len 0", ["train", "corpus.txt", *T, "--seq-len", "0"], 2, "--seq-len"),
    ("steps 0", ["train", "corpus.txt", *T, "--steps", "0"], 2, "--steps"),
    ("embed -1", ["train", "corpus.txt", *T, "--embed", "-1"], 2, "--embed"),
    ("lr 0", ["train", "corpus.txt", *T, "--lr", "0"], 2, "--lr must be above 0"),
    ("lr negative", ["train", "corpus.txt", *T, "--lr", "-0.1"], 2, "--lr must be above 0"),
    ("epochs 0", ["train", "corpus.txt", "--epochs", "0"], 2, "--epochs must be above 0"),
    ("time 0", ["train", "corpus.txt", "--time", "0s"], 2, "must be longer than zero"),
    ("time garbage", ["train", "corpus.txt", "--time", "soon"], 2, "cannot read the duration"),
    ("val-frac 0", ["train", "corpus.txt", *T, "--val-frac", "0"], 2, "--val-frac"),
    ("dropout 1", ["train", "corpus.txt", *T, "--dropout", "1"], 2, "--dropout"),
    ("keep 0", ["train", "corpus.txt", *T, "--keep", "0"], 2, "--keep"),
    ("threads 0", ["train", "corpus.txt", *T, "--threads", "0"], 2, "--threads"),
    ("unknown cell", ["train", "corpus.txt", *T, "--cell", "transformer"], 2, "--cell"),
    ("encoding-errors bogus", ["train", "corpus.txt", *T, "--encoding-errors", "ignore"], 2, "--encoding-errors"),
    ("no corpus", ["train", *T], 2, "name a corpus file"),
    ("resume missing run", ["train", "--resume", "no_such_run"], 1, "cannot resume: no run folder at no_such_run"),
    ("resume empty folder", ["train", "--resume", "adir"], 1, "cannot resume: no checkpoints in adir"),
    ("resume with corpus", ["train", "corpus.txt", "--resume", RUN], 2, "leave out the CORPUS"),
    ("init-from other vocabulary", ["train", "unknown_chars.txt", *T, "--init-from", RUN], 1,
     "fine-tuning needs the same characters"),
    ("init-from missing", ["train", "corpus.txt", *T, "--init-from", "nothing.pt"], 1, "no checkpoint or run folder at nothing.pt"),
    ("unwritable ./checkpoints", ["train", "corpus.txt", *T], 1, "cannot write to checkpoints"),
    ("--run over a damaged run", ["train", "corpus.txt", *T, "--run", "damaged"], 1, "damaged already holds a run"),
    ("sample, no checkpoints", ["sample"], 1, "no checkpoints found in"),
    ("sample, missing checkpoint", ["sample", "gone.pt"], 1, "no checkpoint or run folder at gone.pt"),
    ("sample, a folder with no run", ["sample", "adir"], 1, "no checkpoints found in adir"),
    ("temp below 0", ["sample", RUN, "--temp", "-0.5"], 2, "--temp must be 0 (greedy) or more"),
    ("top-p 0", ["sample", RUN, "--top-p", "0"], 2, "--top-p must be in (0, 1]"),
    ("top-p above 1", ["sample", RUN, "--top-p", "1.5"], 2, "--top-p must be in (0, 1]"),
    ("top-k below 0", ["sample", RUN, "--top-k", "-1"], 2, "--top-k must be 0 (off) or more"),
    ("length below 0", ["sample", RUN, "--length", "-1"], 2, "--length must be 0 or more"),
    ("num 0", ["sample", RUN, "--num", "0"], 2, "--num must be at least 1"),
    ("prime with unknown chars", ["sample", RUN, "--prime", "The \u2603king\u00e9", "--length", "10", "--seed", "1"], 0,
     "never saw, skipped: '\u2603\u00e9'"),
    ("eval, missing file", ["eval", RUN, "nope.txt"], 1, "corpus file not found: nope.txt"),
    ("eval, unknown characters", ["eval", RUN, "unknown_chars.txt"], 1, "character(s) the model's vocabulary lacks"),
    ("eval, invalid utf-8", ["eval", RUN, "latin1.txt"], 1, "offset 1203"),
    ("list, no folder", ["checkpoints", "list", "--dir", "nowhere"], 1, "no run folder"),
    ("show, missing", ["checkpoints", "show", "nowhere"], 1, "no checkpoint or run folder at nowhere"),
    ("prune, no folder", ["checkpoints", "prune", "--dir", "nowhere"], 1, "no folder"),
]


@pytest.mark.parametrize("args,code,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(args, code, fragment, tmp_path, trained):
    """One clear line on stderr, exit 1 (data) or 2 (usage), no traceback, nothing written to ./checkpoints."""
    (tmp_path / "corpus.txt").write_text(make_text(20_000))
    (tmp_path / "adir").mkdir()
    for name, content in BAD.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / ckm.ckpt_name(10)).write_bytes(b"PK\x03\x04 cut short")
    if "unwritable" in fragment or fragment.startswith("cannot write"):
        (tmp_path / "checkpoints").write_text("a file where the runs folder should be\n")
    args = [str(trained) if a == RUN else a for a in args]
    r = cli(*args)
    assert r.exit_code == code, r.output
    assert fragment in r.stderr, r.stderr
    if code == 0:
        assert r.stdout.startswith("The king")
        return
    if r.stderr.startswith("error:"):  # charrnn's own errors: exactly one line
        error_line(r)
    else:  # the parser's (Typer's) usage errors
        assert "Invalid value" in r.stderr or "No such option" in r.stderr
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.is_dir() or not any(ckpts.iterdir()), "something was written to ./checkpoints"
    assert [p.name for p in (tmp_path / "damaged").iterdir()] == [ckm.ckpt_name(10)]
