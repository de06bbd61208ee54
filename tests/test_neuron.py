"""The sentiment unit (charrnn/neuron): find (a planted unit, a bound unit), the fixing hook, sample --sentiment, neuron show, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from charrnn import checkpoint as ckm
from charrnn import neuron as sm
from charrnn.config import SentimentConfig, TrainConfig
from charrnn.neuron import find as fd
from charrnn.neuron.find import take
from charrnn.data import Vocab
from charrnn.errors import UsageError
from charrnn.model import CharRNN, ModelConfig, Write
from charrnn.sample import SampleConfig, generate
from charrnn.train import Trainer
from conftest import cut_after, run_cli

POS = ["great", "wonderful", "loved", "superb", "fine"]
NEG = ["awful", "boring", "hated", "dull", "poor"]
NOUN = ["film", "movie", "plot", "cast", "ending"]


def review(rng: random.Random, y: int) -> str:
    words = POS if y else NEG
    return " ".join(f"the {rng.choice(NOUN)} was {rng.choice(words)}." for _ in range(rng.randint(2, 4)))


def write_tsv(path: Path, n: int, seed: int = 0, rows: list[str] | None = None) -> Path:
    rng = random.Random(seed)
    lines = rows if rows is not None else [f"{i % 2}\t{review(rng, i % 2)}" for i in range(n)]
    path.write_text("label\ttext\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def bound(tmp_path_factory):
    """A tiny LSTM trained with --sentiment-unit on the synthetic reviews (shared by the CLI tests)."""
    import os

    d = tmp_path_factory.mktemp("bound")
    old, old_cache = os.getcwd(), os.environ.get("CHARRNN_CACHE")
    os.chdir(d)
    try:
        os.environ["CHARRNN_CACHE"] = str(d / ".cache")
        torch.set_num_threads(1)
        train = write_tsv(d / "reviews.tsv", 600, seed=1)
        test = write_tsv(d / "test.tsv", 200, seed=2)
        r = run_cli("train", train, "--sentiment-unit", "--hidden", "32", "--layers", "1", "--seq-len", "32",
                    "--batch-size", "16", "--steps", "300", "--threads", "1", "--run", d / "run", "-q")
        assert r.exit_code == 0, r.stderr
    finally:
        os.chdir(old)
        if old_cache is None:
            os.environ.pop("CHARRNN_CACHE", None)
        else:
            os.environ["CHARRNN_CACHE"] = old_cache
    return {"run": d / "run", "train": train, "test": test}


# ---------------------------------------------------------------- finding


def planted_model(texts: list[str], labels: list[int], unit: int = 3) -> tuple[CharRNN, Vocab]:
    """An LSTM whose cell `unit` adds up a per-character sentiment score; every other unit is noise."""
    vocab = Vocab.from_text_chars(set("".join(texts)) | {"\n"})
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(len(vocab), "lstm", 1, 8, 4, 0.0))
    pos = {c: 1 for c in vocab.chars}
    neg = {c: 1 for c in vocab.chars}
    for t, y in zip(texts, labels):
        for c in t:
            (pos if y else neg)[c] += 1
    score = torch.tensor([math.log(pos[c] / neg[c]) for c in vocab.chars])
    H = 8
    with torch.no_grad():
        model.embedding.weight[:, 0] = score
        w_ih, b = model.rnn.weight_ih_l0, model.rnn.bias_ih_l0  # gate rows: input, forget, cell, output
        w_ih[:, 0] = 0.0  # only the planted unit reads the score
        w_ih[2 * H + unit] = 0.0
        w_ih[2 * H + unit, 0] = 1.0
        model.rnn.weight_hh_l0[[unit, H + unit, 2 * H + unit, 3 * H + unit]] = 0.0
        b[unit], b[H + unit], b[2 * H + unit] = 10.0, 10.0, 0.0  # input open, forget open: c adds tanh(score)
        model.rnn.bias_hh_l0[[unit, H + unit, 2 * H + unit]] = 0.0
    return model.eval(), vocab


def test_find_recovers_planted_unit():
    rng = random.Random(0)
    labels = [i % 2 for i in range(400)]
    texts = [review(rng, y) for y in labels]
    model, vocab = planted_model(texts, labels, unit=3)
    feats = sm.final_states(model, vocab, texts)
    # the batched, length-sorted gather equals stepping each text alone
    one = sm.unit_trace(model, vocab, texts[5], 3, -1, "c")[-1]
    assert abs(float(feats["c"][5, 0, 3]) - one) < 1e-4
    y = torch.tensor(labels, dtype=torch.float32)
    fit, val, test = torch.arange(0, 240), torch.arange(240, 320), torch.arange(320, 400)
    res = sm.find_unit(take(feats, fit), y[fit], take(feats, val), y[val], take(feats, test), y[test],
                       "c", [0])
    assert (res.unit, res.polarity, res.layer) == (3, 1, 0)
    assert res.single_unit_accuracy >= 0.75 and res.test_examples == 80
    assert res.fix_values["positive"] > 0 > res.fix_values["negative"]


def test_l1_sparsity_grows_with_strength():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 20, generator=g, dtype=torch.float64)
    y = (X[:, 4] - 0.5 * X[:, 7] > 0).double()
    nz = [int((fd.fit_l1(X, y, lam)[0] != 0).sum()) for lam in (0.2, 0.05, 0.001)]
    assert nz[0] <= nz[1] <= nz[2] and nz[0] >= 1
    w, b = fd.fit_l1(X, y, 0.05)
    assert int(torch.argmax(w.abs())) == 4 and fd.accuracy(X, y, w, b) > 0.9


def test_bound_unit_reads_sentiment_and_find_stores_it(bound, tmp_path):
    ck = ckm.load(ckm.resolve(bound["run"]))
    rec = ck["sentiment"]
    assert rec["source"] == "bind" and rec["unit"] == sm.BOUND_UNIT and rec["state"] == "c+h"
    assert rec["fix_values"]["positive"] > rec["fix_values"]["negative"]
    out = tmp_path / "found.pt"
    r = run_cli("neuron", "find", bound["run"], bound["train"], "--test", bound["test"], "--neuron", "0",
                "--json", "--out", out)
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["unit"] == 0 and got["polarity"] == 1 and got["test_examples"] == 200
    assert got["single_unit_accuracy"] >= 0.7, got
    assert ckm.load(out)["sentiment"]["source"] == "find"
    # without --neuron it chooses among all units, and says so in a table
    r = run_cli("neuron", "find", bound["run"], bound["train"], "--no-save")
    assert r.exit_code == 0, r.stderr
    assert "single-unit accuracy" in r.stderr and "all-units accuracy" in r.stderr


def test_bound_unit_changes_what_the_model_expects(bound):
    """Text is likelier with the unit fixed to its own label than to the opposite one."""
    model, vocab, ck = ckm.load_model(bound["run"])
    rec = ck["sentiment"]
    rng = random.Random(5)
    labels = [i % 2 for i in range(40)]
    texts = [review(rng, y)[:40] for y in labels]
    texts = [t.ljust(40, " ") for t in texts]
    ids = torch.tensor([[vocab.stoi["\n"]] + vocab.encode(t) for t in texts])
    losses = {}
    for mode in ("matched", "opposite"):
        pos = torch.tensor(labels) == (1 if mode == "matched" else 0)
        values = torch.where(pos, torch.tensor(rec["fix_values"]["positive"]), torch.tensor(rec["fix_values"]["negative"]))
        hook = sm.hook_for(model, rec["unit"], values, rec["state"], rec["layer"])
        with torch.no_grad():
            _, loss, _ = model(ids[:, :-1], ids[:, 1:], hook=hook)
        losses[mode] = loss.item()
    assert losses["matched"] < losses["opposite"] - 0.01, losses


@pytest.mark.parametrize("read", [0, 8])
def test_binding_resume_is_exact(tmp_path, read):
    tsv = write_tsv(tmp_path / "r.tsv", 300)
    cfg = TrainConfig(hidden=16, layers=1, seq_len=16, batch_size=8, steps=30, eval_every=10, keep=10,
                      sentiment=SentimentConfig(unit=True, read=read), threads=1)
    Trainer.new([tsv], cfg, run_dir=tmp_path / "full").run()
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    cut_after(cut, 10)
    Trainer.resume(cut).run()
    a = ckm.load(tmp_path / "full" / ckm.ckpt_name(30))
    b = ckm.load(cut / ckm.ckpt_name(30))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_binding_fixes_the_unit_at_every_character_of_a_fixed_review(tmp_path):
    tsv = write_tsv(tmp_path / "r.tsv", 300)
    cfg = TrainConfig(hidden=16, layers=2, seq_len=24, batch_size=8, steps=1, sentiment=SentimentConfig(unit=True),
                      threads=1)
    tr = Trainer.new([tsv], cfg, run_dir=tmp_path / "run")
    b = tr.objective
    x, y, _ = tr.batcher.get(0)
    carry = b.before_step(0, tr.model.init_state(8))
    seen = {}
    # the top layer's output for all 8 streams (the contrast's second pass, on some, writes the opposite values)
    tr.model.head.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]) if len(args[0]) == 8 else None)
    b.forward(tr.model, x, y, carry)
    lab, h = b._labels, seen["h"][..., sm.BOUND_UNIT].detach()
    fixed = lab >= 2
    assert fixed.any() and ((lab == 0) | (lab == 1)).any()
    want = torch.tanh(((lab % 2) * 2 - 1).float() * cfg.sentiment.value)
    assert torch.allclose(h[fixed], want[fixed])  # fixed at every character, not only at chunk starts
    assert torch.all(h[~fixed] == 0)  # elsewhere the network reads 0: "no label"
    assert tr.model.config.bound_unit == sm.BOUND_UNIT


def test_sentiment_unit_needs_labels(tmp_path, corpus):
    from conftest import TINY

    r = run_cli("train", corpus, "--sentiment-unit", "--steps", "5", *TINY)
    assert r.exit_code == 2 and "labeled" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", corpus, "--sentiment-contrast", "3", "--steps", "5", *TINY)
    assert r.exit_code == 2 and "add --sentiment-unit" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train", corpus, "--sentiment-read", "8", "--steps", "5", *TINY)
    assert r.exit_code == 2 and "add --sentiment-unit" in r.stderr
    r = run_cli("train", corpus, "--sentiment-unit", "--sentiment-forced", "1.5", "--steps", "5", *TINY)
    assert r.exit_code == 2 and "--sentiment-forced" in r.stderr
    r = run_cli("train", corpus, "--sentiment-unit", "--sentiment-fixed", "1.5", "--steps", "5", *TINY)
    assert r.exit_code == 2 and "--sentiment-fixed" in r.stderr
    r = run_cli("train", corpus, "--sentiment-fixed", "0.5", "--steps", "5", *TINY)
    assert r.exit_code == 2 and "add --sentiment-unit" in r.stderr


# ---------------------------------------------------------------- fixing a unit


def test_fix_hook_holds_the_unit_every_step():
    torch.manual_seed(0)
    vocab = Vocab.from_text_chars("abc \n")
    model = CharRNN(ModelConfig(len(vocab), "lstm", 2, 16, 0, 0.0)).eval()
    with torch.no_grad():
        model.head.weight[:, 5] = torch.linspace(-20, 20, len(vocab))  # make the unit matter to the output
    hook = sm.hook_for(model, unit=5, value=1.5, state="c", layer=-1)
    seen = []

    def spy(layer, t, state):
        state = hook(layer, t, state)
        if layer == 1:
            seen.append(state[1][:, 5].clone())
        return state

    cfg = SampleConfig(length=30, prime="ab", seed=3, num=2)
    fixed = generate(model, vocab, cfg, hook=spy)
    assert len(seen) == 32 and all(torch.all(v == 1.5) for v in seen)
    free = generate(model, vocab, cfg)
    assert fixed != free
    # 'c+h' fixes c at the value and h at its tanh, before the head reads h
    both = sm.hook_for(model, unit=5, value=1.5, state="c+h", layer=-1)
    h, c = both(1, 0, (torch.zeros(2, 16), torch.zeros(2, 16)))
    assert torch.all(c[:, 5] == 1.5) and torch.allclose(h[:, 5], torch.tensor(math.tanh(1.5)))
    assert torch.all(h[:, :5] == 0) and torch.all(c[:, 6:] == 0)
    assert generate(model, vocab, cfg, hook=both) != fixed
    gru = CharRNN(ModelConfig(len(vocab), "gru", 1, 8, 0, 0.0))
    assert sm.default_state(gru) == "h"
    with pytest.raises(Exception, match="no 'c' state"):
        sm.hook_for(gru, 1, 0.5, "c")


def test_sample_sentiment_through_cli(bound):
    args = ("sample", bound["run"], "--length", "120", "--temp", "0.5", "--seed", "4", "--prime", "the ")
    pos = run_cli(*args, "--sentiment", "positive")
    neg = run_cli(*args, "--sentiment", "negative")
    assert pos.exit_code == 0 and neg.exit_code == 0, pos.stderr + neg.stderr
    assert pos.stdout.startswith("the ") and pos.stdout != neg.stdout
    score = lambda t: sum(t.count(w) for w in POS) - sum(t.count(w) for w in NEG)  # noqa: E731
    many = ("--num", "20", "--jsonl")
    pos, neg = run_cli(*args, "--sentiment", "positive", *many), run_cli(*args, "--sentiment", "negative", *many)
    assert score(pos.stdout) > score(neg.stdout)
    hand = run_cli(*args, "--neuron", "2", "--value", "0.7", "--state", "h", "--num", "2", "--jsonl")
    assert hand.exit_code == 0 and len(hand.stdout.splitlines()) == 2
    bad = run_cli(*args, "--neuron", "2")
    assert bad.exit_code == 2 and "--value" in bad.stderr


def test_guidance_draws_from_the_amplified_contrast():
    torch.manual_seed(0)
    vocab = Vocab.from_text_chars("abc \n")
    model = CharRNN(ModelConfig(len(vocab), "lstm", 1, 8, 0, 0.0)).eval()
    ck = {"sentiment": {"unit": 3, "layer": 0, "state": "c", "polarity": 1,
                        "fix_values": {"positive": 1.0, "negative": -1.0}}}
    hook, said = sm.steering_hook(model, ck, "positive", guided_rows=2)
    assert "contrasted with -1.000" in said
    seen = []

    def spy(layer, t, state):
        state = hook(layer, t, state)
        seen.append(state[1][:, 3].clone())
        return state

    cfg = SampleConfig(length=6, prime="ab", seed=1, num=2, guidance=2.0, precision="fp32")
    (a, b) = generate(model, vocab, cfg, hook=spy)
    assert len(a) == len(b) == 8 and all(v.tolist() == [1.0, 1.0, -1.0, -1.0] for v in seen)
    # the same draw by hand: log p_own + 2 * (log p_own - log p_opposite) over the characters the own row
    # finds plausible, the two rows fed the same text
    from charrnn.sample import GUIDANCE_PLAUSIBLE, categorical

    g = torch.Generator().manual_seed(1)
    st = model.init_state(4)
    ids = vocab.encode("ab")
    with torch.no_grad():
        for i in ids:
            lg, st = model.step(torch.full((4,), i), st, hook)
        text = []
        for _ in range(6):
            lp, lq = torch.log_softmax(lg[:2], -1), torch.log_softmax(lg[2:], -1)
            ruled_out = lp < lp.max(-1, keepdim=True).values + math.log(GUIDANCE_PLAUSIBLE)
            mix = (lp + 2.0 * (lp - lq)).masked_fill(ruled_out, float("-inf"))
            nxt = categorical(torch.softmax(mix, -1), g)
            text.append(nxt)
            lg, st = model.step(nxt.repeat(2), st, hook)
    assert [a[2:], b[2:]] == ["".join(vocab.chars[int(t[r])] for t in text) for r in range(2)]
    with pytest.raises(UsageError, match="--guidance"):
        sm.steering_hook(model, ck, guided_rows=2)


def test_sample_guidance_through_cli(bound):
    args = ("sample", bound["run"], "--length", "60", "--seed", "2", "--num", "3", "--jsonl")
    r = run_cli(*args, "--sentiment", "negative", "--guidance", "1.5")
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3
    r = run_cli(*args, "--guidance", "1")
    assert r.exit_code == 2 and "--guidance" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # --sentiment guides by default (BOUND_GUIDANCE for a bound unit); --guidance 0 is plain fixing
    from charrnn.sample import BOUND_GUIDANCE, SENTIMENT_GUIDANCE

    default = run_cli(*args, "--sentiment", "positive")
    same = run_cli(*args, "--sentiment", "positive", "--guidance", str(BOUND_GUIDANCE))
    found_default = run_cli(*args, "--sentiment", "positive", "--guidance", str(SENTIMENT_GUIDANCE))
    plain = run_cli(*args, "--sentiment", "positive", "--guidance", "0")
    assert default.exit_code == same.exit_code == plain.exit_code == found_default.exit_code == 0
    assert default.stdout == same.stdout != plain.stdout
    assert default.stdout != found_default.stdout


def test_a_found_unit_keeps_the_lighter_default_guidance():
    from charrnn.sample import BOUND_GUIDANCE, SENTIMENT_GUIDANCE, default_guidance

    plain = CharRNN(ModelConfig(vocab_size=5, hidden=8, layers=1))
    bound = CharRNN(ModelConfig(vocab_size=5, hidden=8, layers=1, bound_unit=0))
    found, bind = {"sentiment": {"unit": 3, "source": "find"}}, {"sentiment": {"unit": 0, "source": "bind"}}
    guide = lambda m, ck: default_guidance(m, ck, "positive")  # noqa: E731
    assert guide(plain, found) == SENTIMENT_GUIDANCE < guide(bound, bind) == BOUND_GUIDANCE
    assert guide(bound, found) == SENTIMENT_GUIDANCE  # a unit found in a bound model
    assert guide(plain, {"sentiment": {"unit": 0, "source": "bind"}}) == SENTIMENT_GUIDANCE  # bound by the design before
    assert default_guidance(bound, bind, None) == 0.0  # no --sentiment: no guidance


def test_steering_benchmark_runs_and_reports_what_it_measured(bound, tmp_path):
    """benchmarks/steering.py end to end on the toy model (the judges are its optional 'bench' extra)."""
    import subprocess
    import sys

    pytest.importorskip("vaderSentiment")
    pytest.importorskip("afinn")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "steering.py"
    out = tmp_path / "samples.jsonl"
    words = write_tsv(tmp_path / "words.tsv", 200, seed=3)  # reviews the model never trained on
    args = [sys.executable, str(script), str(bound["run"]), str(bound["test"]), "--num", "12",
            "--length", "40", "--loss-reviews", "20", "--samples-out", str(out)]
    r = subprocess.run([*args, "--words-from", str(words)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stderr.strip().splitlines()[-1])
    rows = {row["set"]: row for row in res["rows"]}
    for judge, sep in res["separation"].items():  # separations are differences of the printed shares
        assert sep["samples"] == pytest.approx(rows["samples --sentiment positive"][judge] - rows["samples --sentiment negative"][judge])
        assert sep["real"] == pytest.approx(rows["real positive reviews"][judge] - rows["real negative reviews"][judge])
    assert rows["samples --sentiment positive"]["n"] == 12 and rows["real negative reviews"]["n"] == 12
    assert 0.0 <= res["generative_accuracy"] <= 1.0 and res["heldout_reviews"] == 20
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 36 and {w["condition"] for w in written} == {"positive", "negative", "none"}
    pos = sum(w["text"].count(p) for w in written if w["condition"] == "positive" for p in POS)
    neg = sum(w["text"].count(p) for w in written if w["condition"] == "negative" for p in POS)
    assert pos > neg  # the toy model's steering shows in what was written
    assert "positive minus negative" in r.stdout
    # fluency: the toy grammar's reviews are real words but for the last one, cut at 40 characters
    real = rows["real positive reviews"]
    assert 0.85 <= real["real_words"] < 1 and real["soup"] == 0 and 0 < real["distinct_5grams"] <= 1
    assert 0 < rows["samples --sentiment positive"]["real_words"] <= 1 and "| real words |" in r.stdout
    # the real words never come from text the model trained on (nor, by default, from a file that is missing)
    for bad in (["--words-from", str(bound["train"])], []):
        r = subprocess.run([*args, *bad], capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "--words-from" in r.stderr.strip().splitlines()[-1]


def test_sample_sentiment_without_unit_says_how(corpus):
    from conftest import TINY

    assert run_cli("train", corpus, "--steps", "5", "--run", "plain", *TINY).exit_code == 0
    r = run_cli("sample", "plain", "--sentiment", "positive", "--length", "10")
    assert r.exit_code == 1
    assert "no sentiment unit" in r.stderr and "neuron find" in r.stderr and "--sentiment-unit" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- showing


def test_neuron_show_terminal_and_html(bound, tmp_path):
    page = tmp_path / "unit.html"
    r = run_cli("neuron", "show", bound["run"], "the film was great. the cast was dull.", "--html", page)
    assert r.exit_code == 0, r.stderr
    assert "the film was great" in r.stderr and "unit 0" in r.stderr
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<span") == len("the film was great. the cast was dull.")
    f = tmp_path / "t.txt"
    f.write_text("the plot was awful.")
    r = run_cli("neuron", "show", bound["run"], "--file", f, "--neuron", "3", "--state", "h")
    assert r.exit_code == 0 and "unit 3" in r.stderr
    r = run_cli("neuron", "show", bound["run"])
    assert r.exit_code == 2 and "TEXT" in r.stderr


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("rows,fragment", [
    (["1\tgood film", "0 bad film no tab"], "malformed row"),
    (["1\tgood film", "maybe\tok film"], "unknown label"),
    (["1\tgood film", "pos\tfine film"], "every example is positive"),
])
def test_find_bad_tsv_is_one_line(bound, tmp_path, rows, fragment):
    tsv = write_tsv(tmp_path / "bad.tsv", 0, rows=rows)
    r = run_cli("neuron", "find", bound["run"], tsv, "--no-save")
    assert r.exit_code == 1 and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_find_skips_unknown_characters_with_a_warning(bound, tmp_path):
    rng = random.Random(5)
    rows = [f"{i % 2}\t{review(rng, i % 2)}" + (" ☃" if i % 7 == 0 else "") for i in range(120)]
    tsv = write_tsv(tmp_path / "snow.tsv", 0, rows=rows)
    r = run_cli("neuron", "find", bound["run"], tsv, "--no-save", "--json", "-q")
    assert r.exit_code == 0, r.stderr
    assert "warning" in r.stderr and "never saw" in r.stderr and "☃" in r.stderr
    assert json.loads(r.stdout)["test_examples"] > 0
    r = run_cli("neuron", "show", bound["run"], "the film ☃ was fine.")
    assert r.exit_code == 0 and "never saw" in r.stderr


def test_reading_pass_runs_the_labeled_texts_of_the_training_split(tmp_path):
    """The binding's reading texts are exactly the labeled texts (cut to their last characters), with their labels."""
    tsv = write_tsv(tmp_path / "r.tsv", 120, seed=4)
    lines = tsv.read_text().splitlines()[1:]
    truth = {t: int(y) for y, t in (ln.split("\t", 1) for ln in lines)}
    plain = tmp_path / "plain.txt"
    plain.write_text("some unlabeled text first\nwith two lines\n")
    cfg = TrainConfig(hidden=16, layers=1, seq_len=16, batch_size=4, steps=1, threads=1,
                      sentiment=SentimentConfig(unit=True, read=50, read_chars=30))
    tr = Trainer.new([plain, tsv], cfg, run_dir=tmp_path / "run")
    b = tr.objective
    starts, ends, labels = b.spans
    texts = [tr.vocab.decode(tr.train_data[a:e].tolist()) for a, e in zip(starts.tolist(), ends.tolist())]
    assert len(texts) >= 90 and all(truth[t] == y for t, y in zip(texts, labels.tolist()))
    seqs, ys = b._reading_batch(7)
    assert len(seqs) == 50 and all(len(s) <= 31 and s[0] == tr.vocab.stoi["\n"] for s in seqs)
    for s, y in zip(seqs, ys.tolist()):
        owners = {truth[t] for t in truth if t.endswith(tr.vocab.decode(s[1:]))}
        assert owners == {int(y)}  # the end of a labeled text, read with its own label
    again, _ = b._reading_batch(7)
    assert again == seqs  # seeded by step: a resumed run reads the same texts
    # the reading loss is on the value `neuron find` reads: the unit's c after the last character
    ends_ = sm.run_to_ends(tr.model, seqs[:5], "cpu")
    for s, e in zip(seqs[:5], ends_):
        tr.model.eval()
        with torch.no_grad():
            _, _, st = tr.model(torch.tensor([s]))
        assert torch.allclose(st[1][-1, 0], e[1][-1].detach(), atol=1e-5)
    # and its gradient reaches the unit's weights
    tr.model.train()
    x, y, _ = tr.batcher.get(0)
    # the reading term alone (the config is frozen; before_step takes the step's contrast weight from it)
    b.sc = dataclasses.replace(b.sc, contrast=0.0)
    carry = b.before_step(0, tr.model.init_state(4))
    write = Write(b._values)
    logits, _, out = tr.model(x, y, carry, write=write)
    b.extra_loss(write.read, x, y, carry, logits).backward()
    assert tr.model.rnn.weight_hh_l0.grad[sm.BOUND_UNIT].abs().sum() > 0


@pytest.mark.parametrize("cell,read", [("gru", 0), ("rnn", 8), ("peephole", 0), ("coupled", 8), ("mlstm", 0), ("mlstm", 8)])
def test_binding_steering_and_finding_work_for_every_cell(tmp_path, cell, read):
    """train --sentiment-unit, sample --sentiment and neuron find on each cell, with either reading loss."""
    tsv = write_tsv(tmp_path / "r.tsv", 200, seed=3)
    run = tmp_path / "run"
    r = run_cli("train", tsv, "--sentiment-unit", "--sentiment-read", str(read), "--cell", cell, "--hidden", "16",
                "--layers", "2", "--seq-len", "16", "--batch-size", "8", "--steps", "4", "--threads", "1",
                "--run", run, "-q")
    assert r.exit_code == 0, r.stderr
    rec = ckm.load(ckm.resolve(run))["sentiment"]
    assert rec["source"] == "bind" and rec["state"] == ("h" if cell in ("gru", "rnn") else "c+h")
    assert rec["observed"]["positive"] and rec["observed"]["negative"]  # the unit was watched where it was read
    out = {}
    for s in ("positive", "negative"):
        r = run_cli("sample", run, "--sentiment", s, "--length", "30", "--seed", "4", "--num", "2", "--jsonl")
        assert r.exit_code == 0, r.stderr
        out[s] = r.stdout
    assert out["positive"] != out["negative"]
    r = run_cli("neuron", "find", run, tsv, "--neuron", "0", "--no-save", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["state"] == ("h" if cell in ("gru", "rnn") else "c")


def test_reading_probe_trains_the_unit_and_reports_dev_accuracy(bound, tmp_path):
    """benchmarks/reading_probe.py end to end on the toy model: the unit's dev accuracy is printed as it learns."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "reading_probe.py"
    before = ckm.load(ckm.resolve(bound["run"]))["model"]
    r = subprocess.run([sys.executable, str(script), str(bound["run"]), "--train", str(bound["train"]),
                        "--dev", str(bound["test"]), "--minutes", "0.1", "--every", "5", "--chars", "30",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("600 training texts, 200 dev; unit 0")
    steps = [ln for ln in lines if " step " in ln]
    assert steps and all(0.0 <= float(ln.split("dev ")[1]) <= 1.0 for ln in steps)
    assert lines[-1].startswith("best dev accuracy")
    after = ckm.load(ckm.resolve(bound["run"]))["model"]  # nothing is saved
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reading_probe_stops_after_steps_with_dropout(bound):
    """--steps ends the probe at that step count, before its time limit; --dropout trains with it."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "reading_probe.py"
    r = subprocess.run([sys.executable, str(script), str(bound["run"]), "--train", str(bound["train"]),
                        "--dev", str(bound["test"]), "--minutes", "5", "--steps", "7", "--every", "100",
                        "--dropout", "0.3", "--weight-decay", "0.01", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("after 7 steps")


# ---------------------------------------------------------------- the objective interface, old checkpoints, one check


def old_record(rec: dict) -> dict:
    """A unit record in the shape checkpoints had before "fix" was the one word (clamp, observed_clamp, train_clamp)."""
    names = {"fix_values": "clamp", "observed_fix_values": "observed_clamp", "train_value": "train_clamp"}
    return {names.get(k, k): v for k, v in rec.items()}


def old_config(cfg: dict) -> dict:
    """A TrainConfig dict in the shape checkpoints had before SentimentConfig: flat sentiment_* fields."""
    from charrnn.config import OLD_SENTIMENT_FIELDS

    out = {k: v for k, v in cfg.items() if k != "sentiment"}
    out.update({old: cfg["sentiment"][new] for old, new in OLD_SENTIMENT_FIELDS.items()})
    return out


def test_a_checkpoint_with_an_old_unit_record_still_steers_shows_and_carries(bound, tmp_path):
    """A record with the old key names (clamp, train_clamp) steers, shows and is carried on exactly like today's."""
    ck = ckm.load(ckm.resolve(bound["run"]))
    assert "fix_values" in ck["sentiment"] and "clamp" not in ck["sentiment"]
    old = dict(ck, sentiment=old_record(ck["sentiment"]))
    assert "clamp" in old["sentiment"] and "train_clamp" in old["sentiment"]
    ckm.save(tmp_path / "old.pt", old)
    assert sm.get_record(ckm.load(tmp_path / "old.pt")) == ck["sentiment"]
    args = ("--length", "40", "--seed", "3", "--num", "2", "--jsonl")
    for s in ("positive", "negative"):
        new_out = run_cli("sample", bound["run"], "--sentiment", s, *args)
        old_out = run_cli("sample", tmp_path / "old.pt", "--sentiment", s, *args)
        assert old_out.exit_code == 0, old_out.stderr
        assert old_out.stdout == new_out.stdout
    r = run_cli("neuron", "show", tmp_path / "old.pt", "the film was great.")
    assert r.exit_code == 0, r.stderr
    fixed = ck["sentiment"]["fix_values"]
    assert f"red {fixed['negative']:.2f} .. green {fixed['positive']:.2f}" in r.stderr  # its fix values, read
    # a plain run started from it carries the record on, in today's shape
    r = run_cli("train", bound["train"], "--init-from", tmp_path / "old.pt", "--steps", "2", "--run", tmp_path / "ft",
                "--seq-len", "16", "--batch-size", "4", "--threads", "1", "-q")
    assert r.exit_code == 0, r.stderr
    assert ckm.load(ckm.resolve(tmp_path / "ft"))["sentiment"] == ck["sentiment"]


def test_old_flat_sentiment_config_is_read():
    cfg = TrainConfig(hidden=16, sentiment=SentimentConfig(unit=True, contrast=3.0, fixed=0.5, read=4,
                                                            read_chars=20, weight=2.0, value=1.5))
    flat = old_config(cfg.to_dict())
    assert "sentiment" not in flat and flat["sentiment_clamp_frac"] == 0.5 and flat["sentiment_read_batch"] == 4
    assert TrainConfig.from_dict(flat) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({"hidden": 16}).sentiment == SentimentConfig()


def test_resume_of_a_bound_run_saved_before_the_change_is_exact(tmp_path):
    """A checkpoint whose config has the flat sentiment_* fields and whose record has the old key names
    resumes to the same weights as today's, with its non-default sentiment options."""
    tsv = write_tsv(tmp_path / "r.tsv", 300)
    cfg = TrainConfig(hidden=16, layers=1, seq_len=16, batch_size=8, steps=20, eval_every=10, keep=10, threads=1,
                      sentiment=SentimentConfig(unit=True, fixed=0.4, contrast=2.0))
    Trainer.new([tsv], cfg, run_dir=tmp_path / "full").run()
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    cut_after(cut, 10)
    path = cut / ckm.ckpt_name(10)
    ck = ckm.load(path)
    ck["train"]["config"] = old_config(ck["train"]["config"])
    ck["sentiment"] = old_record(ck["sentiment"])
    assert ck["sentiment"]["observed"]["positive"]  # the binding's observed values ride along
    ckm.save(path, ck)
    tr = Trainer.resume(cut)
    assert tr.cfg.sentiment == SentimentConfig(unit=True, fixed=0.4, contrast=2.0)
    assert tr.objective.observed == ckm.load(tmp_path / "full" / ckm.ckpt_name(10))["sentiment"]["observed"]
    tr.run()
    a = ckm.load(tmp_path / "full" / ckm.ckpt_name(20))
    b = ckm.load(cut / ckm.ckpt_name(20))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert b["train"]["config"] == a["train"]["config"] and b["sentiment"] == a["sentiment"]


class Recording:
    """Wraps a Trainer objective and records how the loop drives it (the calls pass through unchanged)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def before_step(self, step, carry, total_steps=0):
        self.calls.append(("before_step", step))
        return self.inner.before_step(step, carry, total_steps)

    def forward(self, net, x, y, carry):
        loss, objective, out = self.inner.forward(net, x, y, carry)
        self.calls.append(("forward", bool(objective.requires_grad), float((objective - loss).detach()) != 0.0))
        return loss, objective, out

    def record(self):
        self.calls.append(("record",))
        return self.inner.record()


@pytest.mark.parametrize("bound_run", [False, True])
def test_plain_and_bound_objectives_are_driven_by_the_same_loop(tmp_path, bound_run):
    from charrnn.neuron.bind import BoundObjective
    from charrnn.objective import LanguageModelObjective

    tsv = write_tsv(tmp_path / "r.tsv", 200)
    cfg = TrainConfig(hidden=16, layers=1, seq_len=16, batch_size=8, steps=3, eval_every=3, threads=1,
                      sentiment=SentimentConfig(unit=bound_run))
    tr = Trainer.new([tsv], cfg, run_dir=tmp_path / "run")
    assert type(tr.objective) is (BoundObjective if bound_run else LanguageModelObjective)
    tr.objective = spy = Recording(tr.objective)
    tr.run()
    steps = [c for c in spy.calls if c[0] != "record"]
    assert steps == [c for s in range(3) for c in (("before_step", s), ("forward", True, bound_run))]
    assert spy.calls[-1] == ("record",)  # asked for its record when the checkpoint was built
    rec = ckm.load(ckm.resolve(tmp_path / "run")).get("sentiment")
    assert (rec is not None and rec["source"] == "bind") == bound_run


def test_one_unit_check_for_sample_show_and_find(tmp_path):
    """sample, neuron show and neuron find reject a state or unit the model lacks with the same line."""
    from conftest import TINY

    tsv = write_tsv(tmp_path / "r.tsv", 60)
    assert run_cli("train", tsv, "--cell", "gru", "--steps", "2", "--run", tmp_path / "gru", *TINY).exit_code == 0
    ck = tmp_path / "gru"
    for bad, want in ((("--neuron", "1", "--state", "c"), "this gru model has no 'c' state; use --state h"),
                      (("--neuron", "99"), "--neuron 99 is out of range; this model has 32 units per layer")):
        got = [run_cli("sample", ck, "--value", "1", "--length", "5", *bad),
               run_cli("neuron", "show", ck, "the film", *bad),
               run_cli("neuron", "find", ck, tsv, "--no-save", *bad)]
        assert [r.exit_code for r in got] == [2, 2, 2], [r.stderr for r in got]
        assert len({r.stderr for r in got}) == 1 and want in got[0].stderr
        assert len(got[0].stderr.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="no 'c' state"):
        sm.check_unit(CharRNN(ModelConfig(5, "rnn", 1, 4, 0, 0.0)), 0, "c+h")


# ---------------------------------------------------------------- scoring texts (neuron score)


def test_score_reproduces_finds_accuracy_from_the_stored_fit(bound, tmp_path):
    """`neuron find` stores a logistic fit; `neuron score` of its test file reaches the accuracy find reported."""
    out = tmp_path / "found.safetensors"
    r = run_cli("neuron", "find", bound["run"], bound["train"], "--test", bound["test"], "--json", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    found = json.loads(r.stdout)
    fit = ckm.load(out)["sentiment"]["logistic"]
    assert fit["fitted_on"] == "find" and fit["slope"] * found["polarity"] > 0
    r = run_cli("neuron", "score", out, bound["test"], "--jsonl")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 200 and [row["line"] for row in rows] == list(range(2, 202))  # file order, TSV line numbers
    assert all(0 <= row["p_positive"] <= 1 and row["label"] in (0, 1) for row in rows)
    acc = sum(row["correct"] for row in rows) / len(rows)
    assert abs(acc - found["single_unit_accuracy"]) <= 1 / 200 + 1e-9, (acc, found)
    assert f"accuracy {acc:.1%}" in r.stderr


def test_bound_run_stores_a_fit_and_scores_plain_lines(bound, tmp_path):
    fit = ckm.load(ckm.resolve(bound["run"]))["sentiment"]["logistic"]
    assert fit["fitted_on"] == "observed" and fit["slope"] > 0
    rng = random.Random(9)
    labels = [i % 2 for i in range(40)]
    lines = [review(rng, y) for y in labels]
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(lines[:2] + ["", "   "] + lines[2:]) + "\n")  # blank lines are skipped
    r = run_cli("neuron", "score", bound["run"], f)  # stdout is not a terminal: JSON lines without --jsonl
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["line"] for row in rows] == [1, 2] + list(range(5, 43)) and "label" not in rows[0]
    assert [row["text"] for row in rows] == lines
    # the values are the unit's after each text's last character, run alone (the batching changes nothing)
    model, vocab, _ = ckm.load_model(bound["run"])
    for row in rows[:8]:
        assert abs(row["value"] - sm.unit_trace(model, vocab, row["text"], 0, -1, "c")[-1]) < 1e-4
    mean = {y: sum(row["p_positive"] for row, l in zip(rows, labels) if l == y) / 20 for y in (0, 1)}
    assert mean[1] > mean[0] + 0.1, mean


def test_score_on_a_terminal_sorts_and_sums_up(bound, tmp_path):
    """In a real terminal (a pty): the texts most positive first, then a summary table with the accuracy."""
    import os
    import pty
    import subprocess
    import sys

    rng = random.Random(4)
    tsv = write_tsv(tmp_path / "few.tsv", 0, rows=[f"{i % 2}\t{review(rng, i % 2)}" for i in range(12)])
    master, slave = pty.openpty()
    env = {**os.environ, "CHARRNN_CACHE": str(tmp_path / ".cache"), "COLUMNS": "200", "NO_COLOR": "1"}
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "neuron", "score", str(bound["run"]), str(tsv), "--show", "3"],
                         stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=120) == 0
    os.close(master)
    text = b"".join(chunks).decode()
    assert "most positive first" in text and "summary" in text and "accuracy" in text, text
    assert "6 more" in text  # 3 most positive, 3 most negative of 12
    ps = [float(m) for m in re.findall(r"[│|]\s+\d+\s+[│|]\s+([01]\.\d{3})\s+[│|]", text)]
    assert len(ps) == 6 and ps == sorted(ps, reverse=True), text
    assert '{"line"' not in text


def test_score_of_an_old_record_gives_values_and_says_why_no_probability(bound, tmp_path):
    ck = ckm.load(ckm.resolve(bound["run"]))
    del ck["sentiment"]["logistic"]
    ckm.save(tmp_path / "old.safetensors", ck)
    r = run_cli("neuron", "score", tmp_path / "old.safetensors", bound["test"])
    assert r.exit_code == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "no stored logistic fit" in warning[0] and "neuron find" in warning[0]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 200 and rows[0]["p_positive"] is None and isinstance(rows[0]["value"], float)


def test_score_bad_input_is_one_line(bound, tmp_path, corpus):
    from conftest import TINY

    assert run_cli("train", corpus, "--steps", "5", "--run", "plain", *TINY).exit_code == 0
    r = run_cli("neuron", "score", "plain", bound["test"])
    assert r.exit_code == 1 and "no sentiment unit" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    bad = write_tsv(tmp_path / "bad.tsv", 0, rows=["1\tgood film", "maybe\tok film"])
    for path, fragment in ((tmp_path / "missing.txt", "missing.txt"), (blank, "every line is blank"),
                           (bad, "unknown label")):
        r = run_cli("neuron", "score", bound["run"], path)
        assert r.exit_code == 1 and fragment in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_cli("neuron", "score", bound["run"], bound["test"], "--show", "0")
    assert r.exit_code == 2
