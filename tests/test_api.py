"""The Python API (charrnn.load, Model, charrnn.train, Run) on real tiny models, against the commands
it stands for, and the examples of docs/api.md run as they are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import charrnn
from charrnn.errors import CharRNNError, CheckpointError, DataError, UsageError
from charrnn.events import EndEvent, EvalEvent, StartEvent, StepEvent
from conftest import Recorder, make_text, run_cli

REPO = Path(__file__).resolve().parent.parent
TINY_OPTIONS = dict(hidden=32, layers=1, seq_len=16, batch_size=8)


def test_the_package_exports_exactly_the_api():
    assert sorted(n for n in charrnn.__all__ if not n.startswith("_")) == ["Model", "Run", "load", "train"]
    for name in ("load", "train"):
        fn = getattr(charrnn, name)
        assert fn.__doc__ and fn.__annotations__.get("return")
    from charrnn.train import Trainer  # the training module, whose import would make charrnn.train a module

    assert charrnn.train is charrnn.api.train and Trainer.__module__ == "charrnn.train"


# ---------------------------------------------------------------- train


def test_train_reports_to_a_function_and_a_receiver_and_prints_nothing(corpus, capfd):
    seen: list = []
    run = charrnn.train([corpus], steps=30, eval_every=10, run_dir="checkpoints/t", callback=seen.append,
                        **TINY_OPTIONS)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # progress is off unless asked for
    kinds = [type(e) for e in seen]
    assert kinds[0] is StartEvent and kinds[-1] is EndEvent and StepEvent in kinds
    evals = [e.val_loss for e in seen if isinstance(e, EvalEvent)]
    assert len(evals) == 3 and run.best_val_loss == min(evals)
    assert run.run_dir == Path("checkpoints/t") and run.step == 30 and run.reason == "done"
    assert seen[0].config.hidden == 32 and seen[0].config.steps == 30  # the options reached TrainConfig
    rec = Recorder()
    again = charrnn.train(resume=run.run_dir, callback=rec)  # a finished run: nothing left to train
    assert again.step == 30 and rec.events[0][0] == "start" and rec.events[-1][0] == "end"
    m = run.load()
    assert isinstance(m, charrnn.Model) and m.config["hidden"] == 32 and m.path.parent == run.run_dir


def test_train_with_a_time_budget_and_progress(corpus, capfd):
    run = charrnn.train(str(corpus), time="2s", eval_every=20, run_dir="checkpoints/timed", progress=True,
                        **TINY_OPTIONS)
    assert run.reason in ("done", "early stop") and run.step > 0 and run.elapsed_s < 30
    meta = json.loads(next(Path("checkpoints/timed").glob("*.json")).read_text())
    assert meta["step"] <= run.step
    out, err = capfd.readouterr()
    assert out == "" and "val loss" in err  # the command's display, on stderr, when asked for


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(hiden=32), "no option 'hiden'"),
    (dict(time="soon"), "cannot read the duration"),
    (dict(time="5m", steps=10), "at most one of"),
    (dict(hidden=0), "--hidden"),
    (dict(callback=42), "callback"),
])
def test_train_bad_options_are_one_line_usage_errors(corpus, kwargs, fragment):
    with pytest.raises(UsageError, match=re.escape(fragment)) as e:
        charrnn.train([corpus], **kwargs)
    assert "\n" not in str(e.value)


def test_train_refuses_a_corpus_or_options_with_resume(corpus):
    with pytest.raises(UsageError, match="resume="):
        charrnn.train([corpus], resume="checkpoints/x")
    with pytest.raises(UsageError, match="hidden"):
        charrnn.train(resume="checkpoints/x", hidden=64)
    with pytest.raises(UsageError, match="name a corpus"):
        charrnn.train([])


# ---------------------------------------------------------------- load, generate, stream


def test_load_a_run_folder_or_a_checkpoint_file(tiny_run):
    m = charrnn.load(tiny_run)
    assert m.path.parent == tiny_run and charrnn.load(m.path).path == m.path
    assert set("The king") <= set(m.vocab) and m.config["cell"] == "lstm" and m.sentiment is None
    assert isinstance(m.module, torch.nn.Module) and not m.module.training
    with pytest.raises(CheckpointError, match="no checkpoint or run folder"):
        charrnn.load(tiny_run / "nothing")



def test_load_an_exported_folder_gives_the_same_model(tiny_run, tmp_path):
    r = run_cli("export", tiny_run, "-o", tmp_path / "exported")
    assert r.exit_code == 0, r.stderr
    full, exported = charrnn.load(tiny_run), charrnn.load(tmp_path / "exported")
    assert exported.vocab == full.vocab and exported.config == full.config
    assert exported.generate("The", length=80, seed=5) == full.generate("The", length=80, seed=5)
    text = "The king speaks softly.\nA fool waits alone.\n"
    assert abs(exported.loss(text) - full.loss(text)) < 1e-6

def test_generate_is_what_sample_prints(tiny_run):
    m = charrnn.load(tiny_run)
    one = m.generate("The", length=60, seed=3, temperature=0.8)
    r = run_cli("sample", tiny_run, "--prime", "The", "--length", "60", "--seed", "3", "--temp", "0.8")
    assert r.exit_code == 0 and [r.stdout.removesuffix("\n")] == one
    many = m.generate("A", num=3, length=40, seed=1, top_k=5, top_p=0.9)
    r = run_cli("sample", tiny_run, "--prime", "A", "--num", "3", "--length", "40", "--seed", "1", "--top-k", "5",
                "--top-p", "0.9", "--temp", "0.8", "--jsonl")
    assert [json.loads(line)["text"] for line in r.stdout.splitlines()] == many
    assert len(many) == 3 and all(len(t) == 41 and t.startswith("A") for t in many)
    assert m.generate(length=20, seed=1)[0] != m.generate(length=20, seed=2)[0]
    assert len(m.generate(length=20)[0]) == 20  # no prime: the text is only what was generated
    for precision in ("fp32", "bf16"):  # a fixed precision: the same text as `sample --precision`
        fixed = m.generate("The", length=60, seed=3, precision=precision)
        r = run_cli("sample", tiny_run, "--prime", "The", "--length", "60", "--seed", "3", "--temp", "0.8",
                    "--precision", precision)
        assert r.exit_code == 0 and [r.stdout.removesuffix("\n")] == fixed
        assert "The" + "".join(m.stream("The", length=60, seed=3, precision=precision)) == fixed[0]


def test_stop_strings_in_generate(tiny_run):
    m = charrnn.load(tiny_run)
    lines = m.generate("The", num=8, length=500, stop="\n", seed=7)
    assert len(lines) == 8 and all(t.startswith("The") and "\n" not in t and len(t) < 100 for t in lines)
    full = m.generate("The", num=8, length=500, seed=7)
    assert lines == [t.split("\n")[0] for t in full]
    kept = m.generate("The", num=8, length=500, stop=["\n", "zzz"], stop_keep=True, seed=7)
    assert kept == [t + "\n" for t in lines]


def test_stream_yields_the_sample_as_it_comes(tiny_run):
    m = charrnn.load(tiny_run)
    it = m.stream("The", length=50, seed=4)
    first = next(it)
    assert len(first) == 1  # a character at a time, before the rest is generated
    pieces = [first, *it]
    assert all(len(p) == 1 for p in pieces) and len(pieces) == 50
    assert "The" + "".join(pieces) == m.generate("The", length=50, seed=4)[0]
    stopped = list(m.stream("The", length=500, stop=" weeps", seed=4))
    assert "The" + "".join(stopped) == m.generate("The", length=500, stop=" weeps", seed=4)[0]
    with pytest.raises(UsageError, match="--stop"):
        m.stream(stop="")  # checked at the call, before any next()


@pytest.mark.parametrize("call,error,fragment", [
    (lambda m: m.generate(temperature=-1), UsageError, "--temp"),
    (lambda m: m.generate(num=0), UsageError, "--num"),
    (lambda m: m.generate(precision="fp16"), UsageError, "--precision"),
    (lambda m: m.generate(stop=["\n", ""]), UsageError, "--stop"),
    (lambda m: m.generate(prime="The €"), DataError, "'€'"),
    (lambda m: m.generate(sentiment="positive"), CheckpointError, "no sentiment unit"),
    (lambda m: m.loss("T"), UsageError, "at least 2 characters"),
    (lambda m: m.loss("The €uro"), DataError, "never saw"),
    (lambda m: m.trace("The king"), UsageError, "unit=K"),
    (lambda m: m.trace("The king", unit=10_000), UsageError, "out of range"),
])
def test_model_errors_are_typed_and_one_line(tiny_run, call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)) as e:
        call(charrnn.load(tiny_run))
    assert isinstance(e.value, CharRNNError) and "\n" not in str(e.value)


# ---------------------------------------------------------------- loss and trace


def test_loss_is_what_eval_prints(tiny_run, tmp_path):
    text = make_text(3000, seed=9)
    f = tmp_path / "held.txt"
    f.write_text(text)
    r = run_cli("eval", tiny_run, f, "--json")
    assert r.exit_code == 0, r.stderr
    m = charrnn.load(tiny_run)
    assert abs(m.loss(text) - json.loads(r.stdout)["loss"]) < 1e-6
    assert m.loss(text) < m.loss("".join(reversed(text)))  # the model knows its text forwards


def test_trace_is_the_unit_after_each_character(tiny_run):
    m = charrnn.load(tiny_run)
    text = "The queen sings alone."
    values = m.trace(text, unit=5)
    assert len(values) == len(text)
    ids = torch.tensor([[m.vocab.index(c) for c in "\n" + text]])  # a text is read after a newline
    _, _, state = m.module(ids, state=m.module.init_state(1))
    assert values[-1] == pytest.approx(state[1][-1, 0, 5].item(), abs=1e-5)  # c, the LSTM's cell state
    assert values[:5] == m.trace(text[:5], unit=5)


def test_a_sentiment_unit_is_the_default_of_trace_and_steers_generate(tiny_run, tmp_path):
    """The unit record `neuron find` stores (here written by hand, for unit 3) makes `trace` read it and
    `generate(sentiment=...)` fix it, as `sample --sentiment` does."""
    from charrnn import checkpoint as ckm

    m = charrnn.load(tiny_run)
    ck = dict(m.checkpoint)
    ck.pop("path")
    ck["sentiment"] = {"unit": 3, "layer": 0, "state": "c", "fix_values": {"positive": 2.0, "negative": -2.0}}
    path = tmp_path / "with_unit.safetensors"
    ckm.save(path, ck)
    s = charrnn.load(path)
    assert s.sentiment["unit"] == 3
    assert s.trace("The king weeps.") == s.trace("The king weeps.", unit=3)
    pos = s.generate("The", length=80, seed=1, sentiment="positive")
    neg = s.generate("The", length=80, seed=1, sentiment="negative")
    assert pos != neg
    r = run_cli("sample", path, "--prime", "The", "--length", "80", "--seed", "1", "--temp", "0.8",
                "--sentiment", "positive")
    assert r.exit_code == 0 and [r.stdout.removesuffix("\n")] == pos


# ---------------------------------------------------------------- docs/api.md


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_examples_of_docs_api_md_run(tmp_path, capsys):
    """Every python block of docs/api.md, in order, in one namespace, in a folder with a corpus.txt."""
    blocks = python_blocks(REPO / "docs" / "api.md")
    assert len(blocks) >= 8
    (tmp_path / "corpus.txt").write_text(make_text())
    namespace: dict = {"__name__": "docs_api"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # say which block broke
            pytest.fail(f"docs/api.md block {i + 1} failed: {type(e).__name__}: {e}\n{block}", pytrace=False)
    out = capsys.readouterr().out
    assert "checkpoints/demo" in out and "nats/char" in out
