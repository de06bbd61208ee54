"""train --precision: auto's choice is recorded and kept on resume, bf16 trains like fp32 with fp32 weights,
gradients, optimiser state and loss, and a CPU without native bf16 refuses bf16 in one line."""

import json
import shutil

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn.config import TrainConfig
from charrnn.device import Precision, cpu_has_bf16
from charrnn.errors import UsageError
from charrnn.model import CharRNN, ModelConfig
from charrnn.precision import measure
from charrnn.train import Trainer

from conftest import TINY, Recorder, cut_after, run_cli

SMALL = dict(hidden=32, layers=1, seq_len=16, batch_size=8, threads=1, warmup_steps=5)
NATIVE = cpu_has_bf16()
# Cells whose kernels run bf16 autocast on any CPU (emulated where the CPU lacks bf16). The fused LSTM's
# oneDNN kernel has no bf16 without native support (it fails to build its primitive), and the fused GRU
# stays fp32 there, so those two are checked only where the CPU has bf16.
BF16_CELLS = ["rnn", "peephole", "coupled", "mlstm"] + (["lstm", "gru"] if NATIVE else [])


def _start(rec: Recorder):
    return next(e for kind, e in rec.events if kind == "start")


def _trainer(corpus, run, **kw) -> tuple[Trainer, Recorder]:
    rec = Recorder()
    return Trainer.new([corpus], TrainConfig(**{**SMALL, **kw}), run_dir=run, callback=rec), rec


def test_auto_is_chosen_once_shown_at_the_start_and_recorded(corpus, tmp_path):
    """Without native bf16, auto is fp32 without trying bf16; with it, auto measured. Either way the
    StartEvent says which and why, and the checkpoint's run state keeps it."""
    t, rec = _trainer(corpus, tmp_path / "run", steps=10)
    t.run()
    start = _start(rec)
    state = ckm.load(ckm.resolve(tmp_path / "run"))["train"]["state"]
    assert state["precision"] == start.precision
    if NATIVE:
        assert start.precision in ("fp32", "bf16") and "measured" in start.precision_why
    else:
        assert start.precision == "fp32" and start.precision_why == "auto: this CPU has no native bf16"


@pytest.mark.parametrize("cell", BF16_CELLS)
def test_bf16_trains_like_fp32_with_fp32_weights_gradients_optimiser_and_loss(corpus, tmp_path, cell):
    """The same run twice from the same seed, fp32 and bf16 (the Precision a bf16 run gets, put in directly:
    here the CPU may lack native bf16, and the option would refuse): the bf16 forward pass really runs in
    bf16, everything that accumulates stays fp32, and the loss after 30 steps is close to fp32's."""
    losses = {}
    for name in ("fp32", "bf16"):
        t, rec = _trainer(corpus, tmp_path / name, cell=cell, steps=30, eval_every=10**6, precision="fp32")
        t.precision = Precision(torch.device("cpu"), name)
        head_dtypes = []
        t.model.head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
        t.run()
        losses[name] = [e.loss for kind, e in rec.events if kind == "step"][-1]
        assert head_dtypes[0] == {"fp32": torch.float32, "bf16": torch.bfloat16}[name]  # the first step's
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in t.model.parameters())
        moments = [v for s in t.optimizer.state.values() for v in s.values() if v.dim() > 0]
        assert moments and all(m.dtype == torch.float32 for m in moments)
        assert all(s.dtype == torch.float32 for s in t.carry)
        x = torch.randint(0, t.model.config.vocab_size, (2, 5))
        with t.precision.autocast():
            _, loss, _ = t.model(x, x)
        assert loss.dtype == torch.float32
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.02), losses


def test_explicit_bf16_trains_where_the_cpu_has_it_and_is_refused_in_one_line_where_not(corpus, tmp_path):
    r = run_cli("train", corpus, *TINY, "--steps", "20", "--precision", "bf16", "--run", tmp_path / "bf16")
    if not NATIVE:
        assert r.exit_code == 2
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
        assert "no native bf16" in r.stderr and "--precision fp32" in r.stderr
        assert not (tmp_path / "bf16").exists()  # refused before the run folder was made
        return
    assert r.exit_code == 0, r.stderr
    fp32 = run_cli("train", corpus, *TINY, "--steps", "20", "--precision", "fp32", "--run", tmp_path / "fp32")
    assert fp32.exit_code == 0, fp32.stderr
    last = {}
    for name in ("bf16", "fp32"):
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        last[name] = [line["val_loss"] for line in lines if "val_loss" in line][-1]
        assert ckm.load(ckm.resolve(tmp_path / name))["train"]["state"]["precision"] == name
    assert last["bf16"] == pytest.approx(last["fp32"], abs=0.05), last


def test_unknown_precision_is_a_usage_error(corpus, tmp_path):
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, bf16"):
        Trainer.new([corpus], TrainConfig(**SMALL, steps=5, precision="fp16"), run_dir=tmp_path / "run")
    r = run_cli("train", corpus, *TINY, "--steps", "5", "--precision", "fp8")
    assert r.exit_code == 2 and "Traceback" not in r.stderr


def test_resume_is_exact_and_keeps_the_recorded_precision(corpus, tmp_path):
    run = tmp_path / "full"
    t, _ = _trainer(corpus, run, steps=30, eval_every=10, keep=10, dropout=0.1, layers=2)
    t.run()
    chosen = t.state.precision
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    cut_after(cut, 10)
    rec = Recorder()
    resumed = Trainer.resume(cut, callback=rec)
    resumed.run()
    assert _start(rec).precision == chosen and _start(rec).precision_why == "the run's own"
    a, b = ckm.load(run / ckm.ckpt_name(30)), ckm.load(cut / ckm.ckpt_name(30))
    assert b["train"]["state"]["precision"] == chosen
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.skipif(not NATIVE, reason="a bf16 run resumes only on a CPU with native bf16 (the next test)")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_bf16_run_resumes_bit_exactly(corpus, tmp_path, cell):
    """Asked for bf16 on a CPU that has it, a run cut at step 10 and resumed ends with the same weights, to
    the bit, as the run that never stopped (the fused kernels' bf16 paths included)."""
    run = tmp_path / "full"
    t, _ = _trainer(corpus, run, cell=cell, steps=30, eval_every=10, keep=10, dropout=0.1, layers=2, precision="bf16")
    t.run()
    assert t.state.precision == "bf16"
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    cut_after(cut, 10)
    rec = Recorder()
    Trainer.resume(cut, callback=rec).run()
    assert _start(rec).precision == "bf16" and _start(rec).precision_why == "the run's own"
    a, b = ckm.load(run / ckm.ckpt_name(30)), ckm.load(cut / ckm.ckpt_name(30))
    assert a["val_loss"] == b["val_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_bf16_run_resumes_only_where_bf16_runs_or_switches_when_told(corpus, tmp_path):
    """A run recorded in bf16: resumed on a CPU without native bf16, one line (exit 1) saying how to go
    on; with --precision fp32 it goes on in fp32 and records that. With native bf16 it simply resumes."""
    run = tmp_path / "run"
    t, _ = _trainer(corpus, run, cell="rnn", steps=20, eval_every=10, keep=10, precision="fp32")
    t.precision, t.state.precision = Precision(torch.device("cpu"), "bf16"), "bf16"
    t.run()
    cut_after(run, 10)
    if NATIVE:
        r = run_cli("train", "--resume", run, "-q")
        assert r.exit_code == 0, r.stderr
        assert ckm.load(ckm.resolve(run))["train"]["state"]["precision"] == "bf16"
        return
    r = run_cli("train", "--resume", run, "-q")
    assert r.exit_code == 1 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "trains in bf16" in r.stderr and "--precision fp32" in r.stderr
    rec = Recorder()
    Trainer.resume(run, callback=rec, precision="fp32").run()
    assert _start(rec).precision == "fp32" and "switched from the run's bf16" in _start(rec).precision_why
    assert ckm.load(ckm.resolve(run))["train"]["state"]["precision"] == "fp32"


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_measuring_leaves_the_run_untouched_and_survives_a_kernel_without_bf16(cell):
    """auto's measurement times a copy: the model's weights, gradients and the random stream are as
    before. Where bf16 cannot run the model (the fused LSTM on a CPU without native bf16) it says so
    (None) instead of failing."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=20, cell=cell, layers=1, hidden=16, dropout=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = measure(model, batch=4, seq_len=8, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    if cell == "lstm" and not NATIVE:
        assert result is None
    else:
        fp32_s, bf16_s = result
        assert fp32_s > 0 and bf16_s > 0
