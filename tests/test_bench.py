"""The benchmark runs and its ratios are computed from what it measured (timings are not asserted)."""

import json

from conftest import run_cli


def test_bench_quick_reports_measured_ratios():
    r = run_cli("bench", "--sections", "startup,train,sample,cells", "--steps", "3", "--rounds", "1",
                "--shapes", "lstm1x32,gru1x32", "--sample-hidden", "32", "--sample-length", "40", "--num", "4",
                "--cells-hidden", "16", "--json")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    train = [row for row in rows if row["section"] == "train"]
    assert [row["shape"].split()[0] for row in train if row["precision"] == "fp32"] == ["lstm", "gru"]
    for row in train:
        assert row["raw_chars_per_s"] > 0 and row["charrnn_chars_per_s"] > 0
        assert abs(row["ratio"] - row["charrnn_chars_per_s"] / row["raw_chars_per_s"]) < 1e-9
    (sample,) = [row for row in rows if row["section"] == "sample"]
    best_raw = max(sample["raw_chars_per_s"], sample["raw_bf16_chars_per_s"])  # one stream against the faster raw loop
    assert abs(sample["ratio"] - sample["charrnn_chars_per_s"] / best_raw) < 1e-9
    assert abs(sample["batched_ratio"] - sample["batched_chars_per_s"] / sample["one_stream_chars_per_s"]) < 1e-9
    assert abs(sample["fp32_ratio"] - sample["fp32_chars_per_s"] / sample["raw_chars_per_s"]) < 1e-9
    assert abs(sample["batched_fp32_ratio"] - sample["batched_fp32_chars_per_s"] / sample["fp32_chars_per_s"]) < 1e-9
    assert sample["precision"] in ("fp32", "bf16") and sample["batched_precision"] in ("fp32", "bf16")
    assert 0 < sample["first_char_s"] < 60 and 0 < sample["import_torch_s"] < 60
    (cells,) = [row for row in rows if row["section"] == "cells"]  # the mLSTM against the fused LSTM
    assert cells["lstm_chars_per_s"] > 0 and cells["mlstm_chars_per_s"] > 0
    assert abs(cells["ratio"] - cells["mlstm_chars_per_s"] / cells["lstm_chars_per_s"]) < 1e-9
    (startup,) = [row for row in rows if row["section"] == "startup"]
    assert startup["seconds"] > 0
    assert "ratio" in r.stderr  # the human-readable lines


def test_bench_train_compares_bf16_with_fp32_or_says_why_not():
    """--train-precision fp32,bf16: a row per precision against a raw loop in the same precision, then
    bf16's speed-up; on a CPU without native bf16, charrnn's refusal and what the raw loop did in bf16."""
    from charrnn.device import cpu_has_bf16

    r = run_cli("bench", "--sections", "train", "--steps", "2", "--rounds", "1", "--shapes", "lstm1x32",
                "--train-precision", "fp32,bf16", "--json")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    train = [row for row in rows if row["section"] == "train"]
    assert [row["precision"] for row in train] == (["fp32", "bf16"] if cpu_has_bf16() else ["fp32"])
    (row,) = [row for row in rows if row["section"] == "precision"]
    assert row["charrnn_fp32_chars_per_s"] == train[0]["charrnn_chars_per_s"]
    if cpu_has_bf16():
        assert row["refused"] is None
        assert abs(row["speedup"] - row["charrnn_bf16_chars_per_s"] / row["charrnn_fp32_chars_per_s"]) < 1e-9
    else:
        assert "no native bf16" in row["refused"] and row["charrnn_bf16_chars_per_s"] is None
    if row["raw_error"] is None:
        assert abs(row["raw_speedup"] - row["raw_bf16_chars_per_s"] / row["raw_fp32_chars_per_s"]) < 1e-9
    else:  # the fused LSTM's bf16 kernel where the CPU lacks bf16
        assert not cpu_has_bf16() and "primitive" in row["raw_error"]
    assert "[precision]" in r.stderr
    r = run_cli("bench", "--sections", "train", "--train-precision", "fp8")
    assert r.exit_code == 2 and "--train-precision" in r.stderr


def test_bench_big_corpus_second_run_uses_cache(tmp_path):
    r = run_cli("bench", "--sections", "big", "--big-mb", "2", "--workdir", tmp_path / "w", "--json")
    assert r.exit_code == 0, r.stderr
    first, second = [json.loads(l) for l in r.stdout.splitlines()]
    assert first["exit_code"] == 0 and second["exit_code"] == 0
    assert first["peak_rss_mb"] > 0 and first["first_step_s"] is not None
    assert len(list((tmp_path / "w" / "cache").glob("*.bin"))) == 1  # encoded once, reused


def test_bench_rejects_unknown_section():
    r = run_cli("bench", "--sections", "everything")
    assert r.exit_code == 2 and "unknown --sections" in r.stderr
    r = run_cli("bench", "--sections", "train", "--device", "tpu")
    assert r.exit_code == 2 and "--device" in r.stderr and "Traceback" not in r.stderr


def test_bench_processes_compares_against_one_process(tmp_path):
    r = run_cli("bench", "--sections", "processes", "--shapes", "lstm1x32", "--steps", "4",
                "--workdir", tmp_path / "w", "--json")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [row["setup"] for row in rows] == ["1 process, 1 thread", "1 process, 2 threads",
                                              "torchrun, 2 processes x 1 thread"]
    base = rows[0]["chars_per_s"]
    for row in rows:
        assert abs(row["ratio"] - row["chars_per_s"] / base) < 1e-9
    # same total batch, same seed, same steps: the same model up to float rounding
    assert abs(rows[2]["val_loss"] - rows[0]["val_loss"]) < 0.02


def test_benchmark_scripts_run_from_the_benchmarks_folder():
    """benchmarks/ holds every benchmark as a script: the cell benchmark measures every cell, and
    raw_vs_charrnn.py is `charrnn bench` (same options)."""
    import subprocess
    import sys
    from pathlib import Path

    from charrnn.model import CELLS

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    r = subprocess.run([sys.executable, str(folder / "cells.py"), "--hidden", "8", "--layers", "1", "--seq-len", "4",
                        "--batch-size", "2", "--steps", "1", "--rounds", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {line.split()[0] for line in r.stdout.splitlines()[2:]} == set(CELLS)
    r = subprocess.run([sys.executable, str(folder / "raw_vs_charrnn.py"), "--sections", "nothing"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown --sections 'nothing'" in r.stderr
    r = subprocess.run([sys.executable, str(folder / "raw_vs_charrnn.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--big-mb" in r.stdout


def test_the_raw_loop_runs_between_charrnns_logged_steps_in_its_precision(tmp_path, monkeypatch):
    """interleaved_train_cps: after every logged step of charrnn's run (every LOG_EVERY steps, and the
    last), the raw loop takes as many steps in the precision the run chose, and exactly `steps` in all."""
    import torch

    from charrnn import bench
    from charrnn.data import Vocab
    from charrnn.train import LOG_EVERY

    corpus = bench.synthetic_corpus(tmp_path)
    text = corpus.read_text()
    data = torch.tensor(Vocab.from_text_chars(text).encode(text), dtype=torch.uint8)
    events: list[str] = []
    real = bench.raw_train_steps

    def counted(*args):
        events.append(f"raw loop in {args[4]}")
        for seconds in real(*args):
            events.append("raw step")
            yield seconds

    monkeypatch.setattr(bench, "raw_train_steps", counted)
    rss_at: list[int] = []
    real_rss = bench.rss_mb
    monkeypatch.setattr(bench, "rss_mb", lambda: rss_at.append(events.count("raw step")) or real_rss())
    steps = LOG_EVERY + 5
    ours, raw, rss, used = bench.interleaved_train_cps(corpus, data, int(data.max()) + 1, bench.Shape("lstm", 1, 32),
                                                       steps, tmp_path / "run", precision="fp32", warmup=2)
    assert used == "fp32" and events[0] == "raw loop in fp32"
    assert ours > 0 and raw > 0 and len(rss) == 1  # from the second logged step on
    assert rss_at == [2, 2 + LOG_EVERY]  # at each logged step, before the raw loop's turn: 2 warm-up, then 10
    assert events.count("raw step") == 2 + steps
