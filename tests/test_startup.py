"""Start-up without garbage collection (charrnn/cli/startup.py): the command line holds collection while a
command starts and always collects again, frozen start-up and all; the library never holds it."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn.cli import startup
from charrnn.data import Vocab
from charrnn.model import CharRNN, ModelConfig


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the objects a settle() froze in this test process go back to being collected
    gc.enable()


def test_hold_stops_collection_and_settle_freezes_start_up_then_collects_again(unfrozen):
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    startup.hold()
    assert not gc.isenabled()
    startup.settle()
    assert gc.isenabled() and gc.get_freeze_count() > frozen
    startup.settle()  # a second settle is harmless
    assert gc.isenabled()


def test_settle_without_hold_leaves_a_library_caller_s_collector_alone(unfrozen):
    gc.disable()  # the caller's own choice: not ours to undo
    startup.settle()
    assert not gc.isenabled()


def _gc_at_exit(args: list[str]) -> subprocess.CompletedProcess:
    """Run `charrnn ARGS` through its real entry point and report the collector's state as it exits."""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('gc', gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr))\n"
            f"sys.argv = ['charrnn', *{args!r}]\n"
            "from charrnn.cli import main\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_sample_collects_again_once_loaded_and_an_early_error_does_too(tmp_path):
    torch.manual_seed(0)
    vocab = Vocab.from_text_chars("abc \n")
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=1, hidden=8))
    path = tmp_path / ckm.ckpt_name(0)
    ckm.save(path, {"model_config": model.config.to_dict(), "vocab": vocab.chars, "model": model.state_dict(),
                    "train": {"step": 0, "state": {}, "config": {}, "corpus": []}, "val_loss": None})
    ok = _gc_at_exit(["sample", str(path), "--length", "20", "--seed", "1"])
    assert ok.returncode == 0 and len(ok.stdout) == 20 + 1  # 20 characters (the default prime is not echoed), newline
    assert "gc True True" in ok.stderr
    bad = _gc_at_exit(["sample", str(tmp_path / "missing.safetensors")])
    assert bad.returncode == 1 and "gc True" in bad.stderr
    listed = _gc_at_exit(["corpus", "list"])  # any other command settles before it runs
    assert listed.returncode == 0 and "gc True True" in listed.stderr
