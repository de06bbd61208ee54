"""Watching a run learn: the seeded sample at each evaluation (samples.jsonl, the progress output), the
validation-loss curve of `checkpoints show`, `charrnn plot`, and TensorBoard logs."""

import json
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn.config import TrainConfig
from charrnn.errors import UsageError
from charrnn.train import Trainer

from conftest import TINY, cut_after, make_text, run_cli
from test_reliability import error_line

SMALL = dict(hidden=32, layers=1, seq_len=16, batch_size=8, threads=1)
LOUD = [a for a in TINY if a != "-q"]  # TINY with the progress output on


def _lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def _train(corpus, run, callback=None, **kw):
    return Trainer.new([corpus], TrainConfig(**{**SMALL, **kw}), run_dir=run, callback=callback).run()


# ---------------------------------------------------------------- eval samples


def test_each_evaluation_logs_and_shows_a_seeded_sample_of_the_model_there(corpus, tmp_path):
    from charrnn.sample import SampleConfig, generate

    r = run_cli("train", corpus, *LOUD, "--run", "run", "--steps", "40", "--eval-every", "20",
                "--eval-sample-len", "60", "--seed", "7")
    assert r.exit_code == 0, r.output
    samples = _lines(Path("run/samples.jsonl"))
    assert [s["step"] for s in samples] == [20, 40]
    evals = [m for m in _lines(Path("run/metrics.jsonl")) if "val_loss" in m]
    for s, m in zip(samples, evals):
        assert set(s) == {"step", "time_s", "val_loss", "text"}
        assert len(s["text"]) == 60 and s["val_loss"] == m["val_loss"] and s["time_s"] == m["elapsed_s"]
    # the sample is the model of that step, sampled with the run's seed at temperature 0.8 (reproducible)
    model, vocab, _ = ckm.load_model(Path("run") / ckm.ckpt_name(40))
    again = generate(model, vocab, SampleConfig(temperature=0.8, length=60, seed=7, precision="fp32"))[0]
    assert again == samples[-1]["text"]
    # and the progress output shows it, under its evaluation's line
    shown = r.stderr.splitlines()
    first = samples[0]["text"].split("\n")[0]
    at = next(i for i, l in enumerate(shown) if l.startswith("step     20  val loss"))
    assert shown[at + 1] == "  │ " + first.rstrip("\n")


def test_the_progress_bar_prints_the_sample_above_itself(corpus, tmp_path, monkeypatch):
    """On a terminal (a Rich console that says it is one) the sample goes above the live progress bar."""
    from rich.console import Console

    from charrnn import ui

    buf = StringIO()
    monkeypatch.setattr(ui, "err", Console(file=buf, force_terminal=True, width=120, highlight=False))
    display = ui.TrainDisplay()
    try:
        _train(corpus, tmp_path / "run", callback=display, steps=20, eval_every=20, eval_sample_len=80)
    finally:
        display.close()
    sample = _lines(tmp_path / "run" / "samples.jsonl")[0]["text"]
    out = buf.getvalue()
    assert "step     20  val loss" in out
    assert ui.sample_block(sample).split("\n")[0] in out


def test_sample_block_makes_control_characters_harmless():
    from charrnn.ui import sample_block

    assert sample_block("ab\x1b[31mc\tx\n\nend\n") == "  │ ab\ufffd[31mc x\n  │ \n  │ end"


def test_resume_is_exact_with_eval_samples_on_and_samples_do_not_touch_training(corpus, tmp_path):
    """A run with samples ends with the same weights as one without (the sample draws nothing from the
    training RNG, dropout included), and a resumed one with the same weights and the same samples."""
    kw = dict(steps=60, eval_every=20, keep=10, dropout=0.1, layers=2)
    _train(corpus, tmp_path / "full", **kw)
    _train(corpus, tmp_path / "off", eval_sample_len=0, **kw)
    assert not (tmp_path / "off" / "samples.jsonl").exists()
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    cut_after(cut, 20)
    Trainer.resume(cut).run()
    a, off, b = (ckm.load(d / ckm.ckpt_name(60)) for d in (tmp_path / "full", tmp_path / "off", cut))
    for k in a["model"]:
        assert torch.equal(a["model"][k], off["model"][k]), k
        assert torch.equal(a["model"][k], b["model"][k]), k
    full = [(s["step"], s["val_loss"], s["text"]) for s in _lines(tmp_path / "full" / "samples.jsonl")]
    resumed = [(s["step"], s["val_loss"], s["text"]) for s in _lines(cut / "samples.jsonl")]
    assert [s[0] for s in full] == [20, 40, 60] and resumed == full
    assert len({s[2] for s in full}) == 3  # the model changed between evaluations, so did its text


def test_eval_sample_len_0_writes_and_shows_none_and_a_negative_one_is_refused(corpus):
    r = run_cli("train", corpus, *LOUD, "--run", "run", "--steps", "20", "--eval-sample-len", "0")
    assert r.exit_code == 0, r.output
    assert not Path("run/samples.jsonl").exists() and "│" not in r.stderr
    bad = run_cli("train", corpus, *TINY, "--run", "bad", "--steps", "20", "--eval-sample-len", "-1")
    assert bad.exit_code == 2 and "--eval-sample-len" in bad.stderr  # the parser's (one line under charrnn.cli.main)
    with pytest.raises(UsageError, match="--eval-sample-len must be from 0"):  # the library's own check
        _train(corpus, Path("lib"), steps=20, eval_sample_len=-1)


# ---------------------------------------------------------------- the curve in the terminal


def test_text_chart_follows_the_curve_within_its_width():
    from charrnn.curves import text_chart

    xs, ys = [10, 20, 30, 40, 50], [4.0, 3.0, 2.5, 2.2, 2.1]
    lines = text_chart(xs, ys, width=50, height=8)
    assert len(lines) == 10 and all(len(l) <= 50 for l in lines)
    plot = lines[:8]
    assert plot[0].startswith("4.000 ┤─") and plot[-1].startswith("2.100 ┤") and plot[-1].rstrip().endswith("─")
    assert lines[-1].split() == ["step", "10", "50"]
    ascii_lines = text_chart(xs, ys, width=50, height=8, ascii=True)
    assert all(l.isascii() for l in ascii_lines) and ascii_lines[0].startswith("4.000 |-")
    rising = text_chart([1, 2], [1.0, 2.0], width=30, height=5)
    assert "╯" in "".join(rising) and "╭" in "".join(rising)


def test_checkpoints_show_draws_the_validation_curve(corpus):
    assert run_cli("train", corpus, *TINY, "--run", "run", "--steps", "60", "--eval-every", "10").exit_code == 0
    r = run_cli("checkpoints", "show", "run")
    assert r.exit_code == 0, r.output
    evals = [m for m in _lines(Path("run/metrics.jsonl")) if "val_loss" in m]
    out = r.stderr
    assert f"validation loss (nats/char): {evals[0]['val_loss']:.4f} at step 10" in out
    chart = [l for l in out.splitlines() if "┤" in l]
    assert len(chart) == 10
    assert chart[0].startswith(f"{max(e['val_loss'] for e in evals):.3f}")
    assert any(l.split() == ["step", "10", "60"] for l in out.splitlines())


# ---------------------------------------------------------------- charrnn plot


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("runs")
    text = home / "corpus.txt"
    text.write_text(make_text())
    for name, cell in (("run-lstm", "lstm"), ("run-gru", "gru")):
        Trainer.new([text], TrainConfig(**SMALL, cell=cell, steps=40, eval_every=10), run_dir=home / name).run()
    return home / "run-lstm", home / "run-gru"


@pytest.mark.parametrize("x", ["steps", "time"])
def test_plot_writes_png_svg_and_a_self_contained_html_page(two_runs, x):
    for name in ("curves.png", "curves.svg", "curves.html"):
        r = run_cli("plot", *two_runs, "-o", name, "--x", x)
        assert r.exit_code == 0, r.output
        assert f"wrote {name}" in r.stderr
    assert Path("curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = Path("curves.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and svg.rstrip().endswith("</svg>")
    page = Path("curves.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</svg>" in page
    for text in (svg, page):
        assert "run-lstm" in text and "run-gru" in text  # the legend's labels, kept as text
        assert ("time (seconds)" if x == "time" else ">step<") in text
    assert "<script" not in page and "<link" not in page and "src=" not in page  # nothing fetched


def test_plot_refuses_a_non_run_path_and_an_unknown_format_in_one_line(two_runs, tmp_path):
    r = run_cli("plot", two_runs[0], tmp_path / "nothing", "-o", "c.png")
    assert r.exit_code == 1 and "no run folder at" in error_line(r)
    r = run_cli("plot", two_runs[0].parent, "-o", "c.png")  # the folder above the runs
    assert r.exit_code == 1 and "is not a run folder" in error_line(r) and "run-lstm" not in error_line(r)
    r = run_cli("plot", two_runs[0], "-o", "c.pdf")
    assert r.exit_code == 2 and ".png, .svg or .html" in error_line(r)
    assert not Path("c.png").exists() and not Path("c.pdf").exists()
    early = tmp_path / "early"  # a run before its first evaluation: left out, with a warning
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 10, "elapsed_s": 1.0, "chars_per_s": 5.0, "loss": 3.0}\n{"step": 2')
    r = run_cli("plot", early, "-o", "c.png")
    assert r.exit_code == 1 and "none of the runs has a validation loss yet" in error_line(r)
    r = run_cli("plot", early, two_runs[0], "-o", "c.svg")
    assert r.exit_code == 0 and "early has no validation loss" in r.stderr
    assert "run-lstm" in Path("c.svg").read_text() and ">early<" not in Path("c.svg").read_text()


def test_plot_without_matplotlib_says_how_to_get_it(two_runs, tmp_path):
    """A real process in which matplotlib cannot be imported (as on an install without the extra)."""
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['charrnn'] + sys.argv[1:]; "
            "from charrnn.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, "plot", str(two_runs[0]), "-o", "c.png"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines == ['error: charrnn plot needs matplotlib, which is not installed; install it with: '
                     'pip install "charrnn[plot]"']
    assert not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------- TensorBoard


def test_crc32c_matches_the_standard_check_value():
    from charrnn.tensorboard import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value
    assert crc32c(b"") == 0


def test_tensorboard_logs_the_runs_scalars_and_read_back(corpus, tmp_path):
    from charrnn.errors import DataError
    from charrnn.tensorboard import read_events

    r = run_cli("train", corpus, *TINY, "--run", "run", "--steps", "40", "--eval-every", "20", "--tensorboard", "tb")
    assert r.exit_code == 0, r.output
    files = list(Path("tb/run").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = read_events(files[0])
    assert events[0]["file_version"] == "brain.Event:2"
    got = {}
    for e in events[1:]:
        for tag, v in e["scalars"].items():
            got.setdefault(tag, []).append((e["step"], v))
    metrics = _lines(Path("run/metrics.jsonl"))
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    assert [s for s, _ in got["loss/train"]] == [m["step"] for m in steps] == [10, 20, 30, 40]
    assert [v for _, v in got["loss/train"]] == pytest.approx([m["loss"] for m in steps], rel=1e-6)
    assert [v for _, v in got["lr"]] == pytest.approx([m["lr"] for m in steps], rel=1e-6)
    assert [v for _, v in got["chars_per_s"]] == pytest.approx([m["chars_per_s"] for m in steps], rel=1e-6)
    assert got["loss/val"] == [(m["step"], pytest.approx(m["val_loss"], rel=1e-6)) for m in evals]
    # a flipped byte is caught by the record's checksum
    data = bytearray(files[0].read_bytes())
    data[-7] ^= 1
    files[0].write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged TensorBoard record"):
        read_events(files[0])


def test_tensorboard_marks_a_resume_as_a_restart(corpus, tmp_path):
    from charrnn.tensorboard import read_events

    assert run_cli("train", corpus, *TINY, "--run", "run", "--steps", "40", "--eval-every", "20", "--keep", "5").exit_code == 0
    cut_after(Path("run"), 20)
    r = run_cli("train", "--resume", "run", "-q", "--tensorboard", "tb")
    assert r.exit_code == 0, r.output
    events = read_events(next(Path("tb/run").glob("events.out.tfevents.*")))
    assert events[1].get("session_start") and events[1]["step"] == 21  # what came after step 20 is replaced
    assert [e["step"] for e in events[2:] if "loss/val" in e.get("scalars", {})] == [40]


def test_tensorboard_folder_that_cannot_be_made_is_one_line_before_training(corpus, tmp_path):
    Path("afile").write_text("x")
    r = run_cli("train", corpus, *TINY, "--run", "run", "--steps", "20", "--tensorboard", "afile/tb")
    assert r.exit_code == 1 and "cannot write TensorBoard logs to afile/tb" in error_line(r)
    assert not Path("run").exists()


def test_tensorboards_own_reader_reads_the_scalars(corpus, tmp_path):
    """Only where the tensorboard package is installed (it is not in the test extra: about 20 MB of
    wheels beyond charrnn's own, grpcio and a data server included); the reader above checks the same."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert run_cli("train", corpus, *TINY, "--run", "run", "--steps", "40", "--eval-every", "20", "--keep", "5",
                   "--tensorboard", "tb").exit_code == 0
    cut_after(Path("run"), 20)  # resumed from step 20: the first session's steps 30 and 40 are logged again
    assert run_cli("train", "--resume", "run", "-q", "--tensorboard", "tb").exit_code == 0
    acc = ea.EventAccumulator(str(Path("tb/run")))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss/train", "loss/val", "lr", "chars_per_s"}
    metrics = _lines(Path("run/metrics.jsonl"))
    evals = [m for m in metrics if "val_loss" in m]
    assert [(s.step, s.value) for s in acc.Scalars("loss/val")] == [
        (m["step"], pytest.approx(m["val_loss"], rel=1e-6)) for m in evals]
    assert [s.step for s in acc.Scalars("loss/train")] == [10, 20, 30, 40]  # the restart replaced 30 and 40


def test_receivers_forward_every_event_a_receiver_knows():
    """Receivers (the display beside a TensorBoard log, or an API callback) hand on every on_* method,
    rollbacks included: the display's own on_rollback, not the warning fallback."""
    from charrnn.events import Receivers, RollbackEvent, WarnEvent
    from conftest import Recorder

    a, b = Recorder(), Recorder()
    both = Receivers(a, b)
    rollback = RollbackEvent(message="loss spike", reason="loss spike", step=9, to_step=5, observed=2.0,
                             level=1.0, lr_scale=0.5)
    both.on_rollback(rollback)
    both.on_warn(WarnEvent("w"))
    assert a.events == b.events == [("rollback", rollback), ("warn", WarnEvent("w"))]
