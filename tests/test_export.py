"""`charrnn export`: the model alone as safetensors + JSON, loaded by every command as its checkpoint is
(same sampled text, same loss, same unit), by torch alone (the docs' snippet), and refused where it
would overwrite something."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn import export as ex
from charrnn.model import CharRNN, ModelConfig
from conftest import TINY, make_text, run_cli
from test_neuron import write_tsv
from test_reliability import cli, error_line

DOCS = Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LSTM trained on labeled reviews, with a sentiment unit stored by `neuron find`."""
    d = tmp_path_factory.mktemp("export")
    tsv = write_tsv(d / "reviews.tsv", 300, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE", str(d / ".cache"))
        mp.chdir(d)
        torch.set_num_threads(1)
        r = run_cli("train", tsv, *TINY, "--threads", "1", "--steps", "40", "--eval-every", "20", "--run", d / "run")
        assert r.exit_code == 0, r.output
        r = run_cli("neuron", "find", d / "run", tsv, "--neuron", "0", "-q")
        assert r.exit_code == 0, r.output
    return {"run": d / "run", "tsv": tsv}


@pytest.fixture
def run(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained["run"], dst)
    return dst


def export_cli(run: Path, out: Path, *extra):
    r = cli("export", run, "-o", out, *extra)
    assert r.exit_code == 0, r.output
    return r


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old" in p.name]


# ---------------------------------------------------------------- what an export holds


def test_export_holds_the_model_alone_in_standard_files(run, tmp_path):
    safe_open = pytest.importorskip("safetensors").safe_open
    out = tmp_path / "exp"
    r = export_cli(run, out)
    path, ck = ckm.open_checkpoint(run)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sentiment.json", "vocab.json",
                                                     "words.txt"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # the reference reader
        assert sorted(f.keys()) == sorted(ck["model"])  # the weights only: no optimiser, RNG or carried state
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), ck["model"][k])
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ck["model_config"]} == ck["model_config"]
    assert cfg["source"]["step"] == ck["train"]["step"] and cfg["parameters"] == sum(t.numel() for t in ck["model"].values())
    assert "".join(json.loads((out / "vocab.json").read_text())) == ck["vocab"]
    rec = json.loads((out / "sentiment.json").read_text())
    assert rec == ck["sentiment"] and "slope" in rec["logistic"]
    # the sizes it reports are the files' and the checkpoint's own, and the export is the smaller
    total = sum(p.stat().st_size for p in out.iterdir())
    full = path.stat().st_size
    assert f"against {ck_size(full)} for the full checkpoint" in r.stderr and ck_size(total) in r.stderr
    assert total < full / 2
    assert leftovers(tmp_path) == []
    # a folder like any other the user makes (mkdtemp's would be private, 0700)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


def ck_size(n: int) -> str:
    from charrnn.ui import fmt_size

    return fmt_size(n)


def test_a_checkpoint_without_a_unit_exports_without_sentiment_json(tmp_path, corpus):
    r = run_cli("train", corpus, *TINY, "--steps", "5", "--run", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    export_cli(tmp_path / "plain", tmp_path / "exp")
    assert not (tmp_path / "exp" / "sentiment.json").exists()
    assert "sentiment" not in ckm.load_model(tmp_path / "exp")[2]


# ---------------------------------------------------------------- loaded wherever a checkpoint is


def test_export_samples_the_same_text_and_scores_the_same_loss(run, trained, tmp_path):
    out = tmp_path / "exp"
    export_cli(run, out)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(line.split("\t")[1] for line in trained["tsv"].read_text().splitlines()[1:100]))
    for args in (["--seed", "1", "--length", "300"], ["--seed", "7", "--num", "3", "--jsonl", "--temp", "0.7"],
                 ["--seed", "1", "--sentiment", "positive", "--length", "200"]):
        a, b = cli("sample", run, *args), cli("sample", out, *args)
        assert a.exit_code == 0 == b.exit_code, a.output + b.output
        assert a.stdout == b.stdout and len(a.stdout) > 200
    a, b, c = (cli("eval", p, text, "--json") for p in (run, out, out / "model.safetensors"))
    assert a.exit_code == 0 == b.exit_code == c.exit_code, a.output + b.output + c.output
    a, b, c = (json.loads(r.stdout)["loss"] for r in (a, b, c))
    assert abs(a - b) <= 1e-6, (a, b)
    assert c == b  # the weights file alone stands for its folder


def test_neuron_commands_and_fine_tuning_take_an_export(run, trained, tmp_path):
    out = tmp_path / "exp"
    export_cli(run, out)
    tsv = trained["tsv"]
    a, b = cli("neuron", "score", run, tsv, "--jsonl"), cli("neuron", "score", out, tsv, "--jsonl")
    assert a.exit_code == 0 == b.exit_code, a.output + b.output
    assert a.stdout == b.stdout and a.stdout.count("\n") == 300
    r = cli("neuron", "show", out, "the film was great.")
    assert r.exit_code == 0 and "unit 0" in r.stderr, r.output
    # neuron find on an export stores its unit in the export's sentiment.json, not in a checkpoint file
    before = (out / "model.safetensors").read_bytes()
    r = cli("neuron", "find", out, tsv, "--neuron", "5", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "sentiment.json").read_text())["unit"] == 5
    assert (out / "model.safetensors").read_bytes() == before and leftovers(out) == []
    assert ckm.load_model(out)[2]["sentiment"]["unit"] == 5
    r = cli("checkpoints", "show", out)  # it has no run to show: one line that says where the run is
    assert r.exit_code == 1 and "is an export" in error_line(r)
    r = cli("train", trained["tsv"], "--init-from", out, "--steps", "2", "--seq-len", "16", "--batch-size", "8",
            "--run", tmp_path / "tuned", "-q")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("cell,bound", [("lstm", None), ("gru", None), ("rnn", None), ("lstm", 3)])
def test_the_documented_snippet_writes_what_charrnn_samples(tmp_path, cell, bound):
    """The docs' torch-only script, run as a process in which charrnn cannot be imported, writes the
    same 300 characters as `charrnn sample DIR --seed 1 --length 300 --precision fp32`."""
    pytest.importorskip("safetensors")
    code = re.search(r"### Load an export with torch alone.*?```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    assert not re.search(r"^\s*(import|from) charrnn", code, re.M) and len(code.strip().splitlines()) <= 32
    chars = sorted(set(make_text(2000)))
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(len(chars), cell, 2, 24, 8, 0.0, bound))  # untrained: any weights must reproduce
    ckm.save(tmp_path / "m.safetensors", {"model_config": model.config.to_dict(), "vocab": "".join(chars),
                                           "model": model.state_dict()})
    export_cli(tmp_path / "m.safetensors", tmp_path / "exp")
    (tmp_path / "snippet.py").write_text("import sys\nsys.modules['charrnn'] = None  # importing charrnn fails\n" + code)
    p = subprocess.run([sys.executable, tmp_path / "snippet.py", tmp_path / "exp"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    want = cli("sample", tmp_path / "exp", "--seed", "1", "--length", "300", "--precision", "fp32")
    assert want.exit_code == 0, want.output
    assert p.stdout == want.stdout and len(p.stdout) == 301


# ---------------------------------------------------------------- never overwriting, bad input


def test_existing_folder_is_refused_without_force_and_only_an_export_is_replaced(run, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    export_cli(run, out)  # an empty folder is fine
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli("export", run, "-o", out)
    assert r.exit_code == 1 and "--force" in error_line(r)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # --force replaces an export (here by one without a unit record: sentiment.json goes too)
    ck = ckm.load(ckm.resolve(run))
    del ck["sentiment"]
    ckm.save(tmp_path / "plain.safetensors", ck)
    export_cli(tmp_path / "plain.safetensors", out, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json", "words.txt"]
    assert leftovers(tmp_path) == []
    # but never a folder holding anything else, such as a run
    r = cli("export", run, "-o", run, "--force")
    assert r.exit_code == 1 and "not an export's" in error_line(r)
    assert ckm.list_checkpoints(run)
    (tmp_path / "file").write_text("x")
    r = cli("export", run, "-o", tmp_path / "file")
    assert r.exit_code == 1 and "is a file" in error_line(r)


def test_bad_export_input_is_one_line(run, tmp_path):
    r = cli("export", run)
    assert r.exit_code == 2 and "--out" in r.output
    r = cli("export", tmp_path / "nothing", "-o", tmp_path / "exp")
    assert r.exit_code == 1 and "no checkpoint or run folder" in error_line(r)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("damage,fragment", [
    ("flip", "damaged"),
    ("config", "not valid JSON"),
    ("no vocab", "lacks vocab.json"),
    ("short vocab", "vocabulary of"),
    ("version", "export format 99"),
])
def test_a_damaged_export_is_one_line_everywhere(run, tmp_path, damage, fragment):
    out = tmp_path / "exp"
    export_cli(run, out)
    if damage == "flip":
        raw = bytearray((out / "model.safetensors").read_bytes())
        for i in range(len(raw) - 64, len(raw) - 32):
            raw[i] ^= 0xFF
        (out / "model.safetensors").write_bytes(bytes(raw))
    elif damage == "config":
        (out / "config.json").write_text("{not json")
    elif damage == "no vocab":
        (out / "vocab.json").unlink()
    elif damage == "short vocab":
        (out / "vocab.json").write_text(json.dumps(json.loads((out / "vocab.json").read_text())[:-1]))
    else:
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    for args in (["sample", out, "--length", "5"], ["eval", out, trained_text(tmp_path)], ["neuron", "show", out, "abc"]):
        r = cli(*args)
        assert r.exit_code == 1 and fragment in error_line(r), (args, r.output)
    with pytest.raises(ckm.CheckpointError, match=fragment):
        ex.load_export(out)


def trained_text(tmp_path: Path) -> Path:
    p = tmp_path / "t.txt"
    p.write_text("the film was great.\n")
    return p
