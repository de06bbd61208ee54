"""Shared fixtures: every test runs in its own folder with its own corpus cache, on small texts it makes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from charrnn.events import TrainEvents

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in a temp folder (so ./checkpoints is the test's own) with a private corpus cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / ".cache"))
    torch.set_num_threads(1)
    yield tmp_path


def make_text(n_chars: int = 20_000, seed: int = 0) -> str:
    """A small, learnable text: sentences from a tiny grammar, so a model's loss falls quickly."""
    rng = random.Random(seed)
    who = ["the king", "a fool", "my lord", "the queen", "good sir"]
    verb = ["speaks", "weeps", "laughs", "sings", "waits"]
    how = ["softly", "at dawn", "in the hall", "for love", "alone"]
    out = []
    size = 0
    while size < n_chars:
        s = f"{rng.choice(who).capitalize()} {rng.choice(verb)} {rng.choice(how)}.\n"
        out.append(s)
        size += len(s)
    return "".join(out)[:n_chars]


@pytest.fixture
def corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(make_text())
    return p


def run_cli(*args: str):
    """Run the CLI in-process with CliRunner; returns the result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from charrnn.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


class Recorder(TrainEvents):
    """A training-events receiver that keeps every event as (name, event), in order."""

    def __init__(self):
        self.events: list = []

    def on_start(self, e):
        self.events.append(("start", e))

    def on_step(self, e):
        self.events.append(("step", e))

    def on_eval(self, e):
        self.events.append(("eval", e))

    def on_save(self, e):
        self.events.append(("save", e))

    def on_warn(self, e):
        self.events.append(("warn", e))

    def on_rollback(self, e):
        self.events.append(("rollback", e))

    def on_end(self, e):
        self.events.append(("end", e))


TINY = ["--hidden", "32", "--layers", "1", "--seq-len", "16", "--batch-size", "8", "-q"]


def cut_after(run: Path, step: int) -> None:
    """The run folder as a kill right after step `step`'s save would leave it: later checkpoints gone."""
    from charrnn import checkpoint as ckm

    for i in ckm.list_checkpoints(run):
        if i.step > step:
            i.path.unlink()
            ckm.sidecar(i.path).unlink()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny model trained on make_text once per test module (its folder, outside the tests' own),
    for tests that only read it. It learns the grammar's lines well enough to end one with a newline."""
    home = tmp_path_factory.mktemp("tiny_run")
    (home / "corpus.txt").write_text(make_text())
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("CHARRNN_CACHE", str(home / ".cache"))
        r = run_cli("train", "corpus.txt", *TINY, "--steps", "120", "--eval-every", "40", "--run", "run")
    assert r.exit_code == 0, r.stderr
    return home / "run"
