"""The checkpoint format and damage: safetensors files whose every load checks a checksum and never
unpickles, damaged files set aside (renamed) and skipped wherever a checkpoint is chosen, one-line
errors for payloads that lack something, and old `.pt` runs that load, resume and upgrade."""

from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn.errors import CheckpointDamaged, CheckpointError
from conftest import TINY, cut_after, make_text, run_cli
from test_reliability import cli, error_line

# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 10, 20, 30 and 40 (all kept), shared by the tests, which copy it."""
    d = tmp_path_factory.mktemp("ckpt")
    (d / "corpus.txt").write_text(make_text(20_000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARRNN_CACHE", str(d / ".cache"))
        mp.chdir(d)
        torch.set_num_threads(1)
        r = run_cli("train", d / "corpus.txt", *TINY, "--threads", "1", "--steps", "40", "--eval-every", "10",
                    "--keep", "10", "--run", d / "run")
    assert r.exit_code == 0, r.output
    assert [i.step for i in ckm.list_checkpoints(d / "run")] == [10, 20, 30, 40]
    return d


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, under ./checkpoints so that `sample` with no path finds it."""
    dst = tmp_path / "checkpoints" / "run"
    shutil.copytree(trained / "run", dst)  # its corpus stays where it was trained, for --resume
    return dst


def flip_in_weights(path: Path, n: int = 64) -> None:
    """Flip n bytes inside the largest weight tensor of a checkpoint, in place (the file keeps its size)."""
    raw = bytearray(path.read_bytes())
    if raw[:4] == ckm.ZIP_MAGIC:  # a .pt: the largest member's data, found from its local header
        with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
            zi = max(z.infolist(), key=lambda i: i.file_size)
        h = zi.header_offset
        start = h + 30 + int.from_bytes(raw[h + 26 : h + 28], "little") + int.from_bytes(raw[h + 28 : h + 30], "little")
        end = start + zi.file_size
    else:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        key = max((k for k in header if k.startswith("model/")), key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
        start, end = (8 + size + o for o in header[key]["data_offsets"])
    mid = (start + end) // 2
    assert end - start > 2 * n
    for i in range(mid, mid + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def as_legacy(path: Path) -> Path:
    """Rewrite a checkpoint the way charrnn wrote it before safetensors: torch.save of the payload to
    step_N.pt, with the sidecar of that time (no sha256); the .safetensors file is removed."""
    ck = ckm.load(path)
    old = path.with_suffix(".pt")
    torch.save(ck, old)
    side = json.loads(ckm.sidecar(path).read_text())
    side.pop("sha256", None)
    side.update(file=old.name, size=old.stat().st_size)
    ckm.sidecar(path).write_text(json.dumps(side) + "\n")
    path.unlink()
    return old


def sample_text(target) -> str:
    r = cli("sample", *([] if target is None else [target]), "--length", "40", "--seed", "3", "--temp", "0.8",
            "--prime", "The")
    assert r.exit_code == 0, r.output
    return r.stdout


def refuse_pickle(monkeypatch) -> None:
    """From here on, unpickling of any kind (and torch.load) raises."""

    def refuse(*a, **k):
        raise AssertionError("a checkpoint load unpickled")

    class Refuse(pickle.Unpickler):
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", Refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


# ---------------------------------------------------------------- the format


def test_payload_round_trips_exactly_through_a_safetensors_file(tmp_path):
    """Any nesting of plain data and tensors comes back equal and of the same types: None, NaN and
    infinities, tuples vs lists, int dict keys (Adam's state), keys that look like the skeleton's tags."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    payload = {
        "train": {"step": 7}, "val_loss": None, "nan": float("nan"), "inf": float("inf"), "ninf": -math.inf,
        "pair": (1, [2.5, "x"]), "list": [(), [], {}], "ints": {0: "a", 3: (True, None)}, "$odd": {"$tensor": 1},
        "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "bf16": torch.ones(2, 3, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.0), "mask": torch.tensor([True, False]),
        "view": torch.arange(12.0).view(3, 4).t(),  # not contiguous
        "carry": (torch.randn(1, 2, 3), torch.randn(1, 2, 3)), "unicode": "é☃\x00",
    }
    path = tmp_path / ckm.ckpt_name(7)
    ckm.save(path, payload)
    safe_open = pytest.importorskip("safetensors").safe_open
    with safe_open(str(path), framework="pt") as f:  # a valid safetensors file, by the reference reader
        meta = f.metadata()
        assert meta["format"] == ckm.FORMAT and len(meta["sha256"]) == 64
        reference = {k: f.get_tensor(k) for k in f.keys()}
    back = ckm.load(path)
    ours = ckm.pack(back)[1]
    assert reference.keys() == ours.keys() and "rng" in ours and "optimizer/state/0/exp_avg" in ours
    assert all(torch.equal(reference[k], ours[k]) and reference[k].dtype == ours[k].dtype for k in ours)
    for k, v in payload.items():
        assert ckm._same(back[k], v), k
    assert isinstance(back["pair"], tuple) and isinstance(back["pair"][1], list) and list(back["ints"]) == [0, 3]
    assert isinstance(back["carry"], tuple) and math.isnan(back["nan"]) and back["ninf"] == -math.inf
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])  # Adam takes it back as it is
    assert ckm.verify(path).step == 7


def test_loading_a_checkpoint_never_unpickles(run, tmp_path, monkeypatch):
    """With every unpickler (and torch.load) made to raise, a new checkpoint still loads, samples,
    resumes and is listed."""
    refuse_pickle(monkeypatch)
    best = ckm.resolve(run)
    assert best.suffix == ".safetensors"
    model, vocab, ck = ckm.load_model(run)
    assert ck["train"]["step"] == 40 and len(vocab) == model.config.vocab_size
    assert cli("sample", run, "--length", "10", "--seed", "1").exit_code == 0
    r = cli("checkpoints", "list", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["checkpoints"] == 4
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- damage


def test_flipped_bytes_in_the_weights_are_caught(run, tmp_path, corpus):
    """64 flipped bytes inside the weights: today's main evaluated such a file silently. Now loading it
    raises a one-line CheckpointDamaged, and `eval` of it exits 1 with one line; the same for a .pt."""
    path = run / ckm.ckpt_name(40)
    before = path.stat().st_size
    flip_in_weights(path)
    assert path.stat().st_size == before  # the sidecar still matches: only the content can tell
    with pytest.raises(CheckpointDamaged) as e:
        ckm.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "checksum" in str(e.value)
    r = cli("eval", path, corpus)
    assert r.exit_code == 1 and "truncated or damaged" in error_line(r)
    assert path.exists()  # a file named directly is never moved
    legacy = as_legacy(run / ckm.ckpt_name(30))
    ckm.load(legacy)  # an intact .pt loads
    flip_in_weights(legacy)
    r = cli("eval", legacy, corpus)
    assert r.exit_code == 1 and "CRC" in error_line(r), r.stderr


def test_keep_1_with_a_damaged_newest_best_keeps_a_healthy_checkpoint(run, tmp_path):
    """Today's main counted a damaged newest (and best) file as good: `prune --keep 1` deleted every
    healthy checkpoint and `sample RUN` then used the damaged one. Now the damaged one is set aside
    (renamed, with one warning line) and the best healthy checkpoint is what is kept and sampled."""
    newest = run / ckm.ckpt_name(40)
    assert ckm.best_of(ckm.list_checkpoints(run)).path == newest  # the loss fell all along
    expected = sample_text(run / ckm.ckpt_name(30))
    flip_in_weights(newest)
    r = cli("checkpoints", "prune", "--keep", "1")
    assert r.exit_code == 0, r.output
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "set it aside" in warnings[0] and newest.name in warnings[0], r.stderr
    assert not newest.exists() and (run / (newest.name + ".damaged")).exists()
    assert (run / "step_00000040.json.damaged").exists()  # its sidecar goes with it
    assert [i.step for i in ckm.list_checkpoints(run)] == [30]
    assert ckm.load(run / ckm.ckpt_name(30))["train"]["step"] == 30
    assert sample_text(run) == expected
    assert sample_text(None) == expected  # no path: the latest run's best


def test_sample_of_a_run_skips_its_damaged_best(run):
    expected = sample_text(run / ckm.ckpt_name(30))
    flip_in_weights(run / ckm.ckpt_name(40))
    r = cli("sample", run, "--length", "40", "--seed", "3", "--temp", "0.8", "--prime", "The")
    assert r.exit_code == 0 and r.stdout == expected
    assert len([l for l in r.stderr.splitlines() if "damaged" in l]) == 1
    assert (run / (ckm.ckpt_name(40) + ".damaged")).exists()


def test_rotation_never_deletes_a_healthy_best_for_a_damaged_newest(run):
    """The newest file damaged and a stale sidecar claiming the best loss for step 20: rotation checks
    the files it keeps, so the damaged one is set aside and the lying one judged by its own loss."""
    side = json.loads(ckm.sidecar(run / ckm.ckpt_name(20)).read_text())
    side["val_loss"] = 0.001  # name and size right, so listing trusts it
    ckm.sidecar(run / ckm.ckpt_name(20)).write_text(json.dumps(side))
    flip_in_weights(run / ckm.ckpt_name(40))
    warned = []
    removed = ckm.rotate(run, keep=1, on_warn=warned.append)
    assert sorted(i.step for i in removed) == [10, 20] and len(warned) == 1
    assert [i.step for i in ckm.list_checkpoints(run)] == [30]


def test_a_sidecar_whose_size_or_name_lies_is_not_trusted(run):
    path = run / ckm.ckpt_name(20)
    real = ckm.verify(path)
    side = json.loads(ckm.sidecar(path).read_text())
    assert side["sha256"] and side["size"] == path.stat().st_size
    for lie in ({"size": side["size"] + 1, "val_loss": 0.001, "step": 99}, {"file": "other.safetensors", "val_loss": 0.001}):
        ckm.sidecar(path).write_text(json.dumps({**side, **lie}))
        got = ckm.info(path)
        assert (got.step, got.val_loss) == (20, real.val_loss)
    ckm.sidecar(path).write_text(json.dumps({**side, "val_loss": "low"}))  # malformed: the file decides
    assert ckm.info(path).val_loss == real.val_loss


def test_resume_skips_a_damaged_newest_and_redoes_it(run, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(run, full)
    flip_in_weights(run / ckm.ckpt_name(40))
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 0, r.output
    assert len([l for l in r.stderr.splitlines() if "damaged" in l]) == 1, r.stderr
    assert (run / (ckm.ckpt_name(40) + ".damaged")).exists()
    a, b = ckm.load(full / ckm.ckpt_name(40)), ckm.load(run / ckm.ckpt_name(40))  # redone from step 30, exactly
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_save_redoes_a_step_whose_file_is_damaged(run, tmp_path):
    """A checkpoint of the step being saved exists but is damaged (its sidecar, claiming a validation
    loss, still matches): today's main kept it and skipped the save; now it is set aside and redone."""
    from charrnn.events import TrainEvents
    from charrnn.train import Trainer

    class Warnings(TrainEvents):
        def on_warn(self, e):
            events.append(e.message)

    full = tmp_path / "full"
    shutil.copytree(run, full)
    damaged = tmp_path / "damaged40"
    shutil.copy(run / ckm.ckpt_name(40), damaged)
    flip_in_weights(damaged)
    cut_after(run, 30)
    events = []
    trainer = Trainer.resume(run, callback=Warnings())
    shutil.copy(damaged, run / ckm.ckpt_name(40))  # damaged under the resumed run's feet
    shutil.copy(ckm.sidecar(full / ckm.ckpt_name(40)), ckm.sidecar(run / ckm.ckpt_name(40)))
    trainer.run()
    assert any("damaged" in m for m in events)
    a, b = ckm.load(full / ckm.ckpt_name(40)), ckm.load(run / ckm.ckpt_name(40))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (run / (ckm.ckpt_name(40) + ".damaged")).exists()


def test_list_and_show_count_a_damaged_checkpoint_as_damaged(run):
    flip_in_weights(run / ckm.ckpt_name(20))
    r = cli("checkpoints", "list", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["checkpoints"] == 3
    assert len([l for l in r.stderr.splitlines() if "damaged" in l]) == 1
    flip_in_weights(run / ckm.ckpt_name(10))
    r = cli("checkpoints", "show", run)
    assert r.exit_code == 0 and "step_00000010" in r.stderr and "set it aside" in r.stderr
    assert sorted(p.name for p in run.glob("*.damaged")) == sorted(
        [ckm.ckpt_name(10) + ".damaged", ckm.ckpt_name(20) + ".damaged", "step_00000010.json.damaged",
         "step_00000020.json.damaged"])


# ---------------------------------------------------------------- payloads that lack something


def _broken(ck: dict, how: str) -> dict:
    ck = dict(ck)
    if how == "no vocab":
        del ck["vocab"]
    elif how == "short vocab":
        ck["vocab"] = ck["vocab"][:-1]
    elif how == "unknown field":
        ck["model_config"] = {**ck["model_config"], "attention_heads": 4}
    elif how == "no model_config":
        del ck["model_config"]
    elif how == "unknown run state":
        ck["train"] = {**ck["train"], "state": {**ck["train"]["state"], "warp_factor": 9}}
    elif how == "no optimizer":
        del ck["optimizer"]
    return ck


@pytest.mark.parametrize("how", ["no vocab", "short vocab", "unknown field", "no model_config"])
def test_a_payload_that_lacks_a_key_or_does_not_fit_is_one_line_exit_1(run, tmp_path, corpus, how):
    """Today's main gave a KeyError or TypeError traceback for these in `checkpoints show`,
    `--init-from` and `--resume`; now every path that loads one says what is wrong in one line."""
    good = ckm.load(run / ckm.ckpt_name(40))
    bad = tmp_path / "bad.safetensors"
    ckm.save(bad, _broken(good, how))
    with pytest.raises(CheckpointError) as e:
        ckm.load_model(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    badrun = tmp_path / "badrun"
    badrun.mkdir()
    ckm.save(badrun / ckm.ckpt_name(40), _broken(good, how))
    for args in (["sample", bad, "--length", "5"], ["eval", bad, corpus], ["checkpoints", "show", bad],
                 ["checkpoints", "show", badrun],
                 ["train", corpus, *TINY, "--steps", "2", "--init-from", bad, "--run", tmp_path / "ft"],
                 ["train", "--resume", badrun, "-q"]):
        r = cli(*args)
        assert r.exit_code == 1, (args, r.output)
        line = error_line(r)
        assert "bad" in line and ("lacks" in line or "does not know" in line or "vocabulary of" in line), line
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("how", ["unknown run state", "no optimizer"])
def test_a_payload_that_cannot_be_resumed_is_one_line_exit_1(run, tmp_path, how):
    good = ckm.load(run / ckm.ckpt_name(40))
    badrun = tmp_path / "badrun"
    badrun.mkdir()
    ckm.save(badrun / ckm.ckpt_name(40), _broken(good, how))
    r = cli("train", "--resume", badrun, "-q")
    assert r.exit_code == 1 and "cannot resume" in error_line(r), r.output


# ---------------------------------------------------------------- old .pt checkpoints


def test_a_run_saved_as_pt_resumes_exactly(run, tmp_path):
    """A run as today's main leaves it (torch.save'd .pt files and their sidecars) resumes exactly."""
    full = tmp_path / "full"
    shutil.copytree(run, full)
    cut_after(run, 20)
    for step in (10, 20):
        as_legacy(run / ckm.ckpt_name(step))
    assert [p.suffix for p in ckm.checkpoint_paths(run)] == [".pt", ".pt"]
    with zipfile.ZipFile(run / "step_00000020.pt") as z:  # a real torch.save zip
        assert any(n.endswith("data.pkl") for n in z.namelist())
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 0, r.output
    a, b = ckm.load(full / ckm.ckpt_name(40)), ckm.load(run / ckm.ckpt_name(40))
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [(i.step, i.path.suffix) for i in ckm.list_checkpoints(run)] == [
        (10, ".pt"), (20, ".pt"), (30, ".safetensors"), (40, ".safetensors")]


def test_upgrade_converts_pt_files_and_they_sample_the_same(run, tmp_path, monkeypatch):
    for i in ckm.list_checkpoints(run):
        as_legacy(i.path)
    before = sample_text(run)
    infos = [(i.step, i.val_loss) for i in ckm.list_checkpoints(run)]
    r = cli("checkpoints", "upgrade", run)
    assert r.exit_code == 0, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 4 and all(l.startswith("upgraded ") for l in lines), r.stderr
    assert not list(run.glob("*.pt")) and len(list(run.glob(ckm.CKPT_GLOB))) == 4
    for p in run.glob(ckm.CKPT_GLOB):
        side = json.loads(ckm.sidecar(p).read_text())
        assert side["file"] == p.name and side["size"] == p.stat().st_size and side["sha256"]
    refuse_pickle(monkeypatch)
    assert [(i.step, i.val_loss) for i in ckm.list_checkpoints(run)] == infos
    assert sample_text(run) == before
    r = cli("checkpoints", "upgrade", run)
    assert r.exit_code == 0 and "no .pt checkpoints" in r.stderr


def test_upgrade_keeps_a_damaged_pt_and_says_so(run, tmp_path):
    old = as_legacy(run / ckm.ckpt_name(10))
    flip_in_weights(old)
    r = cli("checkpoints", "upgrade", old)
    assert r.exit_code == 1 and "could not be upgraded" in r.stderr.splitlines()[-1]
    assert old.exists() and not (run / ckm.ckpt_name(10)).exists()


def test_rewriting_a_checkpoint_in_place_keeps_its_sidecar_right(run, tmp_path):
    """`neuron find` rewrites a checkpoint in place (a bigger file): its sidecar follows, so listings
    keep trusting it instead of reading the file."""
    path = run / ckm.ckpt_name(20)
    ck = ckm.load(path)
    ck["sentiment"] = {"unit": 3, "polarity": 1, "note": "x" * 5000}
    ckm.save(path, ck)
    side = json.loads(ckm.sidecar(path).read_text())
    assert side["size"] == path.stat().st_size and side["step"] == 20 and side["cell"] == "lstm"
    assert ckm._sidecar_meta(path) is not None
