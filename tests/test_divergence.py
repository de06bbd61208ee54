"""Smaller holes around divergence and fine-tuning: a signal inside a streak of bad steps saves the last
good state, a non-finite final evaluation is not "done", --init-from sizes the learning rate and dropout
by the checkpoint's width, and the fp16 loss scaler's state is part of the checkpoint."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

import charrnn.assemble as assemble_mod
from charrnn import checkpoint as ckm
from charrnn.config import BASE_LR, TrainConfig
from charrnn.errors import TrainingDiverged
from charrnn.precision import Choice
from charrnn.events import TrainEvents
from charrnn.recovery import TEST_NAN_ENV
from charrnn.train import Trainer
from conftest import run_cli

SMALL = dict(hidden=32, layers=1, seq_len=16, batch_size=8, threads=1)


def all_finite(run) -> list[int]:
    """Steps of the run's checkpoints, after checking that every one holds finite weights."""
    steps = []
    for p in sorted(run.glob(ckm.CKPT_GLOB)):
        ck = ckm.load(p)
        assert all(torch.isfinite(v).all() for v in ck["model"].values()), p
        steps.append(ck["train"]["step"])
    return steps


def test_a_signal_during_a_streak_of_bad_steps_saves_the_last_good_state(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_NAN_ENV, "5+")  # a NaN weight at step 5, every time: bad steps from there

    class OnEvent(TrainEvents):
        def on_warn(self, e):  # a real SIGINT, sent the moment the first bad step is reported
            if "non-finite loss" in e.message:
                os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    trainer = Trainer.new([corpus], TrainConfig(**SMALL, steps=60, eval_every=4), run_dir=run, callback=OnEvent())
    summary = trainer.run()
    assert summary["reason"] == "interrupted" and summary["step"] == 4
    assert all_finite(run) == [4]  # before: a step-6 checkpoint holding the NaN weight


def test_a_non_finite_final_evaluation_is_not_done(corpus, tmp_path, monkeypatch):
    """A time budget that runs out right after a step left NaN weights: the final evaluation is NaN. The run
    used to end "done" with val_loss nan; now it rolls back, saves the last good state and says so."""
    monkeypatch.setenv(TEST_NAN_ENV, "3")
    budget = 1.0
    started = []

    class OnEvent(TrainEvents):
        def on_start(self, e):
            started.append(time.perf_counter())

        def on_warn(self, e):
            if "non-finite loss" in e.message:  # let the budget run out here
                time.sleep(max(0.0, budget - (time.perf_counter() - started[0])) + 0.2)

    run = tmp_path / "run"
    trainer = Trainer.new([corpus], TrainConfig(**SMALL, time_s=budget), run_dir=run, callback=OnEvent())
    with pytest.raises(TrainingDiverged, match=r"final evaluation \(step 4\) was not finite.*step 0"):
        trainer.run()
    assert all_finite(run) == [0]


def test_init_from_takes_learning_rate_and_dropout_from_the_checkpoints_width(corpus, tmp_path):
    wide = tmp_path / "wide"
    r = run_cli("train", corpus, "--hidden", "512", "--layers", "1", "--dropout", "0.2", "--steps", "1",
                "--batch-size", "2", "--seq-len", "8", "-q", "--run", wide)
    assert r.exit_code == 0, r.output
    # on its own, this corpus (18,000 training characters) would get a 2x128 model and 5e-3
    tuned = tmp_path / "tuned"
    r = run_cli("train", corpus, "--init-from", wide, "--steps", "1", "--batch-size", "2", "--seq-len", "8",
                "-q", "--run", tuned)
    assert r.exit_code == 0, r.output
    ck = ckm.load(tuned / ckm.ckpt_name(1))
    assert ck["model_config"]["hidden"] == 512
    assert ck["train"]["config"]["lr"] == round(BASE_LR * math.sqrt(256 / 512), 6)  # 0.003536, not 0.005
    assert ck["train"]["config"]["dropout"] == ck["model_config"]["dropout"] == 0.2  # the checkpoint's, not 0.0


def test_the_fp16_loss_scale_is_saved_and_resumed(corpus, tmp_path, monkeypatch):
    """fp16 autocast, and so the GradScaler, happens on CUDA GPUs without bf16; here the run's choice is
    made fp16 on the CPU (torch has CPU autocast and a CPU GradScaler), so the same code paths run."""
    fp16 = Choice("fp16", "as on a CUDA GPU without bf16")
    monkeypatch.setattr(assemble_mod, "choose", lambda *args: fp16)
    monkeypatch.setattr(assemble_mod, "for_resume", lambda recorded, *args: fp16)
    run = tmp_path / "run"
    # a cell written out in PyTorch ops: oneDNN's fused CPU LSTM has no fp16 kernel
    trainer = Trainer.new([corpus], TrainConfig(**SMALL, cell="peephole", steps=8, eval_every=4), run_dir=run)
    scaler = trainer.precision.scaler
    assert scaler is not None
    # a scale and growth count a longer run could have reached, not the initial ones
    scaler.load_state_dict({**scaler.state_dict(), "scale": 256.0, "_growth_tracker": 3})
    trainer.run()
    saved = ckm.load(run / ckm.ckpt_name(8))["scaler"]
    assert saved == scaler.state_dict() and saved["scale"] <= 256.0 and saved["_growth_tracker"] != 0
    resumed = Trainer.resume(run)
    assert resumed.precision.scaler.state_dict() == saved
