"""The training loop: loss falls, metrics and checkpoints are written, resume is exact, init-from works."""

import json
import math
import shutil

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn.config import TrainConfig
from charrnn.train import Trainer, lr_at

from conftest import Recorder, cut_after, make_text

SMALL = dict(hidden=32, layers=1, seq_len=16, batch_size=8, threads=1)


def _train(corpus, run, **kw):
    cfg = TrainConfig(**{**SMALL, **kw})
    rec = Recorder()
    t = Trainer.new([corpus], cfg, run_dir=run, callback=rec)
    return t.run(), rec.events


def test_loss_falls_and_run_folder_is_complete(corpus, tmp_path):
    summary, events = _train(corpus, tmp_path / "run", steps=120, eval_every=40)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "elapsed_s", "chars_per_s"} <= set(l) for l in lines)
    evals = [l for l in lines if "val_loss" in l]
    assert [l["step"] for l in evals] == [40, 80, 120]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(len(set(corpus.read_text())))
    assert math.isclose(evals[-1]["val_bpc"], evals[-1]["val_loss"] / math.log(2))
    kinds = {e for e, _ in events}
    assert {"start", "step", "eval", "save", "end"} <= kinds
    # best + latest kept, older rotated out
    infos = ckm.list_checkpoints(tmp_path / "run")
    assert [i.step for i in infos] == [120]
    assert summary["best_val_loss"] == evals[-1]["val_loss"]


def test_checkpoint_is_self_contained(corpus, tmp_path):
    _train(corpus, tmp_path / "run", steps=20)
    path = ckm.resolve(tmp_path / "run")
    ck = ckm.load(path)
    for key in ("model", "optimizer", "model_config", "vocab", "rng", "train", "versions", "val_loss"):
        assert key in ck
    assert ck["train"]["step"] == 20 and ck["train"]["state"]["total_steps"] == 20
    assert set(ck["vocab"]) == set(corpus.read_text())
    model, vocab, _ = ckm.load_model(path)
    assert model.config.hidden == 32 and vocab.chars == ck["vocab"]


def test_resume_is_exact(corpus, tmp_path):
    """Resuming from a mid-run checkpoint ends with the same weights and loss as the uninterrupted run."""
    run = tmp_path / "full"
    _train(corpus, run, steps=60, eval_every=20, keep=10, dropout=0.1, layers=2)
    # the state after step 20 as a kill right after that save would leave it
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    cut_after(cut, 20)
    trainer = Trainer.resume(cut)
    assert trainer.state.step == 20
    summary = trainer.run()
    assert summary["step"] == 60
    a = ckm.load(run / ckm.ckpt_name(60))
    b = ckm.load(cut / ckm.ckpt_name(60))
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the resumed run's metrics have no duplicated steps
    steps = [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert steps == [20, 40, 60]


def test_init_from_starts_from_weights(corpus, tmp_path):
    _train(corpus, tmp_path / "base", steps=60)
    base = ckm.load(ckm.resolve(tmp_path / "base"))
    ft = tmp_path / "ft.txt"
    ft.write_text(make_text(8000, seed=5))
    cfg = TrainConfig(**{**SMALL, "hidden": 999, "steps": 1})  # architecture comes from the checkpoint
    t = Trainer.new([ft], cfg, run_dir=tmp_path / "ft", init_from=tmp_path / "base")
    assert t.model.config.hidden == 32
    assert torch.equal(t.model.state_dict()["head.weight"], base["model"]["head.weight"])
    t.run()
    assert ckm.list_checkpoints(tmp_path / "ft")


def test_time_budget_stops_on_time(corpus, tmp_path):
    summary, events = _train(corpus, tmp_path / "run", time_s=3.0)
    assert 2.5 <= summary["elapsed_s"] < 8
    start = [d for e, d in events if e == "start"][0]
    assert start.time_budget_s == 3.0
    # the schedule was fitted to the budget: the last step is near the schedule's end
    ck = ckm.load(ckm.resolve(tmp_path / "run"))
    st = ck["train"]["state"]
    assert st["step"] >= 0.5 * st["total_steps"]


def test_schedule_warms_up_and_decays():
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, min_lr_frac=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-2)
    assert lr_at(100, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(50, 100, cfg) < lr_at(20, 100, cfg)


def test_default_schedule_decays_to_zero_and_its_last_step_still_learns():
    cfg = TrainConfig(lr=5e-3)  # min_lr_frac's default: the decay ends at zero (docs/training.md)
    last = 999  # steps 0..999 of a 1,000-step run
    assert lr_at(1000, 1000, cfg) == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_at(last, 1000, cfg) < 1e-7
    assert lr_at(last - 100, 1000, cfg) > lr_at(last, 1000, cfg)


def test_defaults_follow_budget_corpus_and_device():
    from charrnn.config import resolve

    big = 1_000_000
    cpu5 = resolve(TrainConfig(), big, 300)
    assert (cpu5.layers, cpu5.hidden, cpu5.batch_size, cpu5.lr, cpu5.patience) == (2, 256, 32, 5e-3, 5)
    assert cpu5.seq_len == 64 and resolve(TrainConfig(), big, 300, "cuda").seq_len == 128
    assert resolve(TrainConfig(steps=100), big, None).patience == 0  # an exact length is not cut short
    assert resolve(TrainConfig(), big, 3600).hidden == 384
    assert resolve(TrainConfig(), big, 4 * 3600).hidden == 512
    assert resolve(TrainConfig(), big, 4 * 3600).lr < 5e-3  # wider models get a smaller step
    assert resolve(TrainConfig(), 20_000, 4 * 3600).hidden < 512  # a tiny corpus gets a narrower model
    gpu5 = resolve(TrainConfig(), big, 300, "cuda")
    assert (gpu5.hidden, gpu5.batch_size) == (512, 128)
    # more passes over the corpus -> more dropout; what the user gave is kept
    assert resolve(TrainConfig(), big, 300).dropout <= resolve(TrainConfig(), 100_000, 300).dropout
    mine = resolve(TrainConfig(hidden=64, batch_size=8, dropout=0.3), big, 300, "cuda")
    assert (mine.hidden, mine.batch_size, mine.dropout) == (64, 8, 0.3)


def test_resume_of_a_checkpoint_from_before_the_eval_interval_moved(corpus, tmp_path):
    """Checkpoints written before the run's evaluation interval moved from the config into the run state
    (the config held the interval the run had chosen) still resume exactly, saving at the same steps."""
    run = tmp_path / "full"
    _train(corpus, run, steps=60, keep=20)  # no --eval-every: the run chooses every 6 steps
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    cut_after(cut, 30)
    path = ckm.resolve(cut)
    old = ckm.load(path)
    assert old["train"]["config"]["eval_every"] is None and old["train"]["state"]["eval_every"] == 6
    old["train"]["config"]["eval_every"] = old["train"]["state"].pop("eval_every")  # the old layout
    path.unlink()
    ckm.save(path, old)
    Trainer.resume(cut).run()
    assert [i.step for i in ckm.list_checkpoints(cut)] == [i.step for i in ckm.list_checkpoints(run)]
    a, b = ckm.load(ckm.resolve(run)), ckm.load(ckm.resolve(cut))
    assert a["val_loss"] == b["val_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_init_from_chooses_lr_for_the_checkpoint_width(corpus, tmp_path):
    """resolve knows the --init-from architecture: the learning rate is the one for the width that trains."""
    from charrnn.config import BASE_LR, resolve

    _train(corpus, tmp_path / "base", steps=10, hidden=512, layers=1)
    cfg = TrainConfig(**{**SMALL, "hidden": 64, "steps": 1})  # asked for 64 units; the checkpoint has 512
    t = Trainer.new([corpus], cfg, run_dir=tmp_path / "ft", init_from=tmp_path / "base")
    assert t.model.config.hidden == 512 and t.cfg.hidden == 512
    assert t.cfg.lr == resolve(TrainConfig(hidden=512), 10_000, None).lr == round(BASE_LR * math.sqrt(256 / 512), 6)


def test_config_is_frozen_and_the_run_keeps_what_it_chooses_in_its_state(corpus, tmp_path):
    """A time-budget run estimates its evaluation interval as it goes: in its RunState, not in the config."""
    import dataclasses

    cfg = TrainConfig(**{**SMALL, "time_s": 2.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    t = Trainer.new([corpus], cfg, run_dir=tmp_path / "run")
    resolved = t.cfg
    t.run()
    assert t.cfg is resolved and t.cfg.eval_every is None and t.state.eval_every >= 10
    ck = ckm.load(ckm.resolve(tmp_path / "run"))
    assert ck["train"]["config"]["eval_every"] is None and ck["train"]["state"]["eval_every"] == t.state.eval_every


def test_events_are_typed_and_a_receiver_implements_only_what_it_needs(corpus, tmp_path):
    from charrnn.events import EndEvent, EvalEvent, SaveEvent, StartEvent, StepEvent, TrainEvents

    summary, events = _train(corpus, tmp_path / "run", steps=40, eval_every=20)
    kinds = {StartEvent: "start", StepEvent: "step", EvalEvent: "eval", SaveEvent: "save", EndEvent: "end"}
    assert all(kinds[type(e)] == name for name, e in events)
    start, end = events[0][1], events[-1][1]
    assert start.config.hidden == 32 and start.resumed_from is None and start.total_steps == 40
    assert [e.step for n, e in events if n == "step"] == [10, 20, 30, 40]
    assert [e.step for n, e in events if n == "eval"] == [20, 40]
    saves = [e for n, e in events if n == "save"]
    assert [e.path.name for e in saves] == [ckm.ckpt_name(20), ckm.ckpt_name(40)] and all(e.size > 0 for e in saves)
    assert summary == {f: getattr(end, f) for f in summary} and end.reason == "done" and end.step == 40

    class OnlyEnd(TrainEvents):  # the other events fall to TrainEvents' no-ops
        def __init__(self):
            self.ends = []

        def on_end(self, e):
            self.ends.append(e)

    only = OnlyEnd()
    Trainer.new([corpus], TrainConfig(**{**SMALL, "steps": 5}), run_dir=tmp_path / "two", callback=only).run()
    assert [e.step for e in only.ends] == [5]


def test_judge_names_what_is_wrong_with_a_step():
    from charrnn.recovery import judge

    assert judge(1.5, 0.7, 65, overflow_skipped=False) is None
    assert judge(float("nan"), 0.7, 65, overflow_skipped=False) == "non-finite loss"
    assert judge(100.0, 0.7, 65, overflow_skipped=False).startswith("exploding loss")
    assert judge(1.5, float("inf"), 65, overflow_skipped=False) == "non-finite gradient"
    assert judge(1.5, float("inf"), 65, overflow_skipped=True) is None  # fp16: the scaler skips it itself


def test_weight_decay_defaults_and_a_config_from_before_it():
    """AdamW's decay: 0.3 for a plain run, 0 for a --sentiment-unit run (measured without it), what the user
    gave otherwise; a run saved before the option existed trained, and so resumes, with plain Adam."""
    from charrnn.config import WEIGHT_DECAY, SentimentConfig, resolve

    assert WEIGHT_DECAY == 0.3 and resolve(TrainConfig(), 1_000_000, 300).weight_decay == WEIGHT_DECAY
    assert resolve(TrainConfig(sentiment=SentimentConfig(unit=True)), 1_000_000, 300).weight_decay == 0.0
    assert resolve(TrainConfig(weight_decay=0.02), 1_000_000, 300).weight_decay == 0.02
    old = resolve(TrainConfig(), 1_000_000, 300).to_dict()
    del old["weight_decay"]
    assert TrainConfig.from_dict(old).weight_decay == 0.0


def test_weight_decay_shrinks_the_weights_and_the_checkpoint_keeps_it(corpus, tmp_path):
    """The same run with and without decay: the decayed weights end smaller, and the optimiser state saved in
    the checkpoint (what a resume continues with) carries the decay the config asked for."""
    norms = {}
    for wd in (0.0, 0.5):
        _train(corpus, tmp_path / f"wd{wd}", steps=30, weight_decay=wd)
        ck = ckm.load(ckm.resolve(tmp_path / f"wd{wd}"))
        assert ck["train"]["config"]["weight_decay"] == wd
        assert {g["weight_decay"] for g in ck["optimizer"]["param_groups"]} == {wd}
        norms[wd] = sum(float(w.float().square().sum()) for w in ck["model"].values())
    assert norms[0.5] < 0.99 * norms[0.0]
