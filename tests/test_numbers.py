"""Numbers and odd input: NaN, infinity and out-of-range values of every numeric option are one line on
stderr and exit 2; running out of memory is one line and exit 1; one sample streams in constant memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tracemalloc

import pytest
import torch

from charrnn import cli
from charrnn.data import Vocab
from charrnn.model import CharRNN, ModelConfig
from charrnn.sample import SampleConfig, apply_temperature, generate, stream_chars
from conftest import TINY, make_text, run_cli

RUN = "<run>"  # stands for the trained run
BIG = str(2**64)
# Train cases name a corpus that does not exist: the value must be refused before anything is read, and
# should a check go missing the case fails on the missing file (exit 1) instead of training.
TR = ["train", "missing.txt"]
CASES = [  # (command line, fragment of the one error line)
    (TR + ["--epochs", "nan"], "--epochs must be a finite number"),
    (TR + ["--epochs", "inf"], "--epochs must be a finite number"),
    (TR + ["--epochs", "-inf"], "--epochs"),
    (TR + ["--grad-clip", "nan"], "--grad-clip"),
    (TR + ["--grad-clip", "inf"], "--grad-clip must be a finite number"),
    (TR + ["--weight-decay", "nan"], "--weight-decay"),
    (TR + ["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (TR + ["--weight-decay", "-0.1"], "--weight-decay"),
    (TR + ["--lr", "nan"], "--lr"),
    (TR + ["--lr", "inf"], "--lr must be a finite number"),
    (TR + ["--dropout", "nan"], "--dropout"),
    (TR + ["--dropout", "inf"], "--dropout"),
    (TR + ["--val-frac", "nan"], "--val-frac"),
    (TR + ["--val-frac", "inf"], "--val-frac"),
    (TR + ["--seed", BIG], "--seed must be a whole number from 0 to 18446744073709551615"),
    (TR + ["--seed", "-1"], "--seed must be a whole number"),
    (TR + ["--time", "9" * 400 + "s"], "too long to count"),
    (TR + ["--hidden", str(10**20)], "--hidden must be at most"),
    (TR + ["--embed", str(10**20)], "--embed must be at most"),
    (TR + ["--layers", str(10**9)], "--layers must be at most"),
    (TR + ["--seq-len", str(10**30)], "--seq-len must be at most"),
    (TR + ["--batch-size", str(10**30)], "--batch-size must be at most"),
    (TR + ["--threads", str(10**20)], "--threads must be at most"),
    (TR + ["--sentiment-unit", "--sentiment-contrast", "inf"], "--sentiment-contrast must be a finite number"),
    (TR + ["--sentiment-unit", "--sentiment-forced", "nan"], "--sentiment-forced"),
    (["sample", RUN, "--temp", "nan"], "--temp must be a finite number"),
    (["sample", RUN, "--temp", "inf"], "--temp must be a finite number"),
    (["sample", RUN, "--temp", "-inf"], "--temp"),
    (["sample", RUN, "--top-p", "nan"], "--top-p"),
    (["sample", RUN, "--top-p", "inf"], "--top-p"),
    (["sample", RUN, "--guidance", "nan", "--neuron", "0", "--value", "1"], "--guidance"),
    (["sample", RUN, "--guidance", "inf", "--neuron", "0", "--value", "1"], "--guidance must be a finite number"),
    (["sample", RUN, "--guidance", "1e9", "--neuron", "0", "--value", "1"], "--guidance must be from 0 (off) to 100"),
    (["sample", RUN, "--seed", BIG], "--seed must be a whole number"),
    (["sample", RUN, "--seed", "-5"], "--seed must be a whole number"),
    (["sample", RUN, "--neuron", "0", "--value", "nan"], "--value must be a finite number"),
    (["sample", RUN, "--neuron", "0", "--value", "-inf"], "--value must be a finite number"),
    (["sample", RUN, "--neuron", str(10**20), "--value", "1"], "--neuron 100000000000000000000 is out of range"),
    (["neuron", "find", RUN, "labeled.tsv", "--seed", BIG], "--seed must be a whole number"),
    (["neuron", "show", RUN, "The king", "--neuron", str(10**20)], "is out of range"),
    (["gradients", RUN, "corpus.txt", "--k", str(10**20)], "lower --k"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("numbers")
    (d / "corpus.txt").write_text(make_text(20_000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE", str(d / ".cache"))
        torch.set_num_threads(1)
        r = run_cli("train", d / "corpus.txt", *TINY, "--steps", "10", "--eval-every", "10", "--run", d / "run")
    assert r.exit_code == 0, r.output
    return d / "run"


def main_in_process(args, monkeypatch, capsys) -> tuple[int, str]:
    """`charrnn ARGS` through cli.main(), as the console script runs it (parser errors included)."""
    monkeypatch.setattr(sys, "argv", ["charrnn", *args])
    monkeypatch.setattr(cli, "_OWN_PROCESS", False)  # main() sets it; this puts it back afterwards
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,fragment", CASES, ids=[" ".join(a[:1] + a[2:])[:60] for a, _ in CASES])
def test_bad_numbers_are_one_line_and_exit_2(args, fragment, trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "corpus.txt").write_text(make_text(2_000))
    (tmp_path / "labeled.tsv").write_text("label\ttext\n1\tgood\n0\tbad\n")
    code, err = main_in_process([str(trained) if a == RUN else a for a in args], monkeypatch, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "checkpoints").exists()


def test_a_temperature_too_small_for_float32_is_greedy(trained):
    """--temp 1e-39 overflows logits / T in float32 (inf, then NaN in the softmax); it acts as its limit, greedy."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, -1.0]])
    assert not torch.isfinite(logits / 1e-39).all()  # what went wrong before
    probs = torch.softmax(apply_temperature(logits, 1e-39), dim=-1)
    assert probs.tolist() == [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]  # ties share the draw
    greedy = run_cli("sample", trained, "--temp", "0", "--length", "40")
    tiny = run_cli("sample", trained, "--temp", "1e-39", "--length", "40", "--seed", "3")
    assert tiny.exit_code == 0 and tiny.stdout == greedy.stdout, tiny.output


def test_out_of_memory_is_one_line_and_exit_1(trained, tmp_path):
    """A --num whose state cannot be allocated; in a real process with a capped address space, so that
    the request fails at once whatever the machine (and a regression cannot eat the machine's memory)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    env = {**os.environ, "CHARRNN_CACHE": str(tmp_path / ".cache")}
    r = subprocess.run([sys.executable, "-m", "charrnn", "sample", str(trained), "--num", str(10**14)],
                       capture_output=True, text=True, env=env, preexec_fn=cap, timeout=120)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: out of memory (asked for ") and "--num" in lines[0], r.stderr


def _tiny_model():
    torch.manual_seed(0)
    vocab = Vocab(sorted(set(make_text(2_000))))
    return CharRNN(ModelConfig(len(vocab), "lstm", 1, 16, 0, 0.0)), vocab


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_one_sample_streams_in_constant_memory():
    """stream_chars (what `sample` uses for one sample) keeps nothing: 20x the length, the same peak;
    generate, which returns the texts, grows with the length (the contrast shows the measure sees it)."""
    model, vocab = _tiny_model()

    def stream(n):
        return lambda: sum(1 for _ in stream_chars(model, vocab, SampleConfig(length=n, seed=1)))

    def keep(n):
        return lambda: generate(model, vocab, SampleConfig(length=n, seed=1))

    short, long = _peak_bytes(stream(1_000)), _peak_bytes(stream(20_000))
    kept_short, kept_long = _peak_bytes(keep(1_000)), _peak_bytes(keep(20_000))
    assert kept_long - kept_short > 19_000 * 8  # a list entry per character
    assert long - short < 19_000  # flat: under one byte per extra character
