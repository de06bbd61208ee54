"""Sampling filters, the seeded generator and stop strings; the sample command's primes and stops."""

import json
import math

import pytest
import torch

from charrnn.data import Vocab
from charrnn.errors import UsageError
from charrnn.model import CharRNN, ModelConfig
from charrnn.sample import (SampleConfig, _past_the_end, categorical, choose_precision, clean_prime, generate, pick,
                            top_k_filter, top_p_filter)
from charrnn.device import cpu_has_bf16
from charrnn.sampleprecision import auto_precision, cache_file, cache_key, cached_choice
from charrnn.stops import StopStrings


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out[0, [0, 2]]).all() and out[0, 1] == 5.0 and out[0, 3] == 4.0
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = ~torch.isinf(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(top_p_filter(logits, 0.1))  # always at least the most likely one
    assert kept.tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9]])
    g = torch.Generator().manual_seed(0)
    assert pick(logits, SampleConfig(temperature=0), g).item() == 1


def test_low_temperature_sharpens():
    logits = torch.tensor([[1.0, 1.5]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    hot = pick(logits, SampleConfig(temperature=1.0), g).float().mean().item()
    cold = pick(logits, SampleConfig(temperature=0.2), g).float().mean().item()
    assert cold > hot  # picks index 1 more often
    assert math.isclose(hot, 1 / (1 + math.exp(-0.5)), abs_tol=0.05)


def test_categorical_draws_each_row_by_its_probabilities_and_never_a_zero():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    ids = categorical(probs, torch.Generator().manual_seed(0))
    first = torch.bincount(ids[0::2], minlength=6).double() / 20000
    assert torch.allclose(first, torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], dtype=torch.double), atol=0.01)
    assert first[[0, 2, 5]].sum() == 0 and ids[1::2].eq(5).all()
    # the same seed draws the same ids; the rows need not sum to 1 (top-k and top-p leave them at 1 anyway)
    again = categorical(probs * 3, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)


def test_categorical_past_the_end_takes_the_last_possible_character_or_raises():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    cum = probs.cumsum(-1)
    # a uniform rounded up to its row's total finds no cumulative probability above it (index 3): the row's
    # last character of nonzero probability is drawn, never the zero one after it
    assert _past_the_end(probs, cum, torch.tensor([3, 1])).tolist() == [1, 1]
    bad = torch.tensor([[0.5, float("nan"), 0.5]])
    with pytest.raises(RuntimeError, match="probability tensor"):
        categorical(bad, torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    vocab = Vocab("\nabcdefgh ")
    return CharRNN(ModelConfig(vocab_size=len(vocab), hidden=16, layers=1)), vocab


def test_same_seed_same_text_and_length():
    m, v = _model()
    a = generate(m, v, SampleConfig(length=40, seed=7, prime="ab"))
    b = generate(m, v, SampleConfig(length=40, seed=7, prime="ab"))
    c = generate(m, v, SampleConfig(length=40, seed=8, prime="ab"))
    assert a == b and a != c
    assert len(a[0]) == 42 and a[0].startswith("ab")


def test_greedy_ignores_seed_and_num_gives_independent_samples():
    m, v = _model()
    g1 = generate(m, v, SampleConfig(temperature=0, length=30, seed=1))
    g2 = generate(m, v, SampleConfig(temperature=0, length=30, seed=2))
    assert g1 == g2
    many = generate(m, v, SampleConfig(length=30, seed=3, num=4))
    assert len(many) == 4 and len(set(many)) > 1


def test_streaming_callback_sees_every_character():
    m, v = _model()
    seen = []
    out = generate(m, v, SampleConfig(length=25, seed=1, prime="a"), on_chars=lambda cs: seen.append(cs[0]))
    assert "a" + "".join(seen) == out[0]


def test_unknown_prime_characters_are_reported():
    kept, unknown = clean_prime("abz€a", Vocab("ab"))
    assert kept == "aba" and unknown == "z€"


@pytest.mark.parametrize("cfg", [SampleConfig(temperature=-1), SampleConfig(top_p=0), SampleConfig(top_p=1.5),
                                 SampleConfig(top_k=-1), SampleConfig(num=0), SampleConfig(precision="fp16")])
def test_invalid_settings_raise(cfg):
    m, v = _model()
    with pytest.raises(UsageError):
        generate(m, v, cfg)


class Measurements:
    """Counts the times auto_precision had to time fp32 against bf16 (its on_measure callback)."""

    def __init__(self):
        self.keys: list[str] = []

    def __call__(self, key: str, result: dict) -> None:
        assert result["fp32_s_per_step"] > 0 and result["bf16_s_per_step"] > 0
        self.keys.append(key)


def test_auto_precision_without_native_bf16_is_fp32_without_measuring():
    m, _ = _model()
    assert choose_precision(m, "fp32", 64) == "fp32" and choose_precision(m, "bf16", 1) == "bf16"
    seen = Measurements()
    assert auto_precision(m, 64, native_bf16=False, on_measure=seen) == "fp32"
    assert seen.keys == [] and not cache_file().exists()  # nothing timed, nothing written
    if not cpu_has_bf16():  # this machine (AVX2 only): the default detection takes the same path
        assert choose_precision(m, "auto", 64) == "fp32" and not cache_file().exists()


def test_without_native_bf16_a_big_model_is_measured_too():
    """A bf16 copy halves the weights read per step, which can pay without native bf16 (2x512 on an
    AVX2-only CPU: 2.7x, docs/speed.md); models of EMULATED_MIN_PARAMS and up are timed there as well."""
    from charrnn.model import CharRNN, ModelConfig
    from charrnn.sampleprecision import EMULATED_MIN_PARAMS

    big = CharRNN(ModelConfig(vocab_size=65, hidden=256, layers=2)).eval()
    assert big.num_params() >= EMULATED_MIN_PARAMS
    seen = Measurements()
    choice = auto_precision(big, 1, native_bf16=False, on_measure=seen)
    assert seen.keys == [cache_key(big, 1)] and cached_choice(cache_key(big, 1)) == choice in ("fp32", "bf16")


def test_auto_precision_is_measured_once_per_shape_then_read_from_the_cache():
    m, _ = _model()
    seen = Measurements()
    first = auto_precision(m, 4, native_bf16=True, on_measure=seen)
    assert first in ("fp32", "bf16") and seen.keys == [cache_key(m, 4)]
    assert cached_choice(cache_key(m, 4)) == first  # written to the cache file
    assert auto_precision(m, 4, native_bf16=True, on_measure=seen) == first
    assert len(seen.keys) == 1  # the second call measured nothing
    auto_precision(m, 8, native_bf16=True, on_measure=seen)  # another batch size is another shape
    assert seen.keys == [cache_key(m, 4), cache_key(m, 8)]
    assert {cached_choice(cache_key(m, 4)), cached_choice(cache_key(m, 8))} <= {"fp32", "bf16"}


@pytest.mark.parametrize("damage", [b"{not json", b"", b"[1, 2]", b'{"version": 1, "choices": []}', b"\xff\xfe\x00"])
def test_a_damaged_precision_cache_is_ignored_and_rewritten(damage):
    m, _ = _model()
    cache_file().parent.mkdir(parents=True)
    cache_file().write_bytes(damage)
    seen = Measurements()
    choice = auto_precision(m, 2, native_bf16=True, on_measure=seen)  # no error: measured as if there were no cache
    assert len(seen.keys) == 1 and cached_choice(cache_key(m, 2)) == choice
    assert auto_precision(m, 2, native_bf16=True, on_measure=seen) == choice and len(seen.keys) == 1


def test_auto_sampling_gives_the_same_text_whatever_the_cache_holds():
    m, v = _model()
    cfg = dict(length=50, seed=11, prime="ab", num=2)

    def auto_text():
        return generate(m, v, SampleConfig(precision="auto", **cfg))

    def text_of_cached_choice():  # what auto samples with: the cached choice, or fp32 where nothing is cached
        return generate(m, v, SampleConfig(precision=cached_choice(cache_key(m, 2)) or "fp32", **cfg))

    empty = auto_text()  # the first call may measure: that must not touch the seeded draws
    assert empty == auto_text() == text_of_cached_choice()
    cache_file().parent.mkdir(parents=True, exist_ok=True)
    cache_file().write_text("{damaged")
    assert auto_text() == text_of_cached_choice()
    if not cpu_has_bf16():  # auto is fp32 here, so every cache state gives the fp32 text
        assert empty == generate(m, v, SampleConfig(precision="fp32", **cfg))


def test_bf16_sampling_is_seeded_and_leaves_the_model_fp32():
    m, v = _model()
    a = generate(m, v, SampleConfig(length=60, seed=5, prime="ab", precision="bf16"))
    b = generate(m, v, SampleConfig(length=60, seed=5, prime="ab", precision="bf16"))
    assert a == b and len(a[0]) == 62 and set(a[0]) <= set(v.chars)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    # the same weights in fp32 give (nearly) the same distribution: the greedy paths agree for a while
    g32 = generate(m, v, SampleConfig(temperature=0, length=12, prime="ab", precision="fp32"))
    g16 = generate(m, v, SampleConfig(temperature=0, length=12, prime="ab", precision="bf16"))
    assert g32[0][:6] == g16[0][:6]


def test_the_bf16_copy_is_made_once_and_again_when_a_weight_changes():
    from charrnn.sample import with_precision

    m, v = _model()
    first = with_precision(m, "bf16")
    assert first is not m and first.head.weight.dtype == torch.bfloat16
    assert with_precision(m, "bf16") is first and with_precision(m, "fp32") is m  # kept, not converted again
    before = generate(m, v, SampleConfig(temperature=0, length=20, prime="ab", precision="bf16"))
    with torch.no_grad():
        m.head.bias.add_(torch.arange(m.head.bias.numel(), dtype=torch.float32) * 5.0)  # as an optimiser step would
    second = with_precision(m, "bf16")
    assert second is not first and torch.equal(second.head.bias, m.head.bias.to(torch.bfloat16))
    after = generate(m, v, SampleConfig(temperature=0, length=20, prime="ab", precision="bf16"))
    assert after != before  # the changed weights sample: the last character's bias now outweighs the rest
    assert after[0][2:] == v.chars[-1] * 20
    m.load_state_dict(_model()[0].state_dict())  # the checkpoint's weights again, as a reload would put back
    assert generate(m, v, SampleConfig(temperature=0, length=20, prime="ab", precision="bf16")) == before


# ---------------------------------------------------------------- stop strings


def _stops(stops, text, keep=False):
    """What StopStrings releases for one stream fed `text` a character at a time, and the flush."""
    s = StopStrings(stops, 1, keep)
    out = [s.feed([c])[0] for c in text]
    return out, s.flush()[0], s.stopped[0]


def test_stop_cut_and_keep():
    out, rest, stopped = _stops(["\n"], "ab\ncd")
    assert "".join(out) == "ab" and rest == "" and stopped
    out, _, _ = _stops(["\n"], "ab\ncd", keep=True)
    assert "".join(out) == "ab\n"


def test_stop_holds_back_a_possible_match_and_releases_it_when_it_fails():
    out, rest, stopped = _stops(["END"], "xEN")
    assert out == ["x", "", ""] and rest == "EN" and not stopped  # held until the end, then flushed
    out, _, _ = _stops(["END"], "xENDy")
    assert out == ["x", "", "", "", ""]  # cut: the held "EN", the "D" and what follows never appear
    out, _, stopped = _stops(["aab"], "aaab")  # the first 'a' starts no match once a third 'a' comes
    assert "".join(out) == "a" and stopped
    out, _, _ = _stops(["END"], "ENx")
    assert out == ["", "", "ENx"]


def test_stop_first_match_wins_and_the_earlier_start_on_a_tie():
    out, _, _ = _stops([".", "!"], "hi! there.")
    assert "".join(out) == "hi"
    out, _, _ = _stops(["\n", "x\n"], "abx\nz")  # both end at the newline: the longer match is cut
    assert "".join(out) == "ab"


def test_stop_streams_end_independently():
    s = StopStrings(["\n"], 2)
    assert s.feed(["a", "b"]) == ["a", "b"]
    assert s.feed(["\n", "c"]) == ["", "c"] and s.stopped == [True, False]
    assert s.feed(["z", "\n"]) == ["", ""] and s.all_stopped


@pytest.mark.parametrize("stop", [("",), ("ok", "")])
def test_empty_stop_string_is_refused(stop):
    m, v = _model()
    with pytest.raises(UsageError, match="--stop"):
        generate(m, v, SampleConfig(stop=stop))


def _counting_hook():
    """A hook that changes nothing and counts the model's steps (its calls for layer 0)."""
    def hook(layer, t, state):
        hook.steps += layer == 0
        return state

    hook.steps = 0
    return hook


def test_generation_ends_when_every_sample_has_stopped(tiny_run):
    """--stop '\\n' --num 8: the model takes as many steps as the prime and the longest line, not --length."""
    from charrnn.checkpoint import load_model

    model, vocab, _ = load_model(tiny_run)
    cfg = SampleConfig(temperature=0.8, length=500, seed=4, num=8, prime="The", stop=("\n",), precision="fp32")
    full = _counting_hook()
    long = generate(model, vocab, SampleConfig(**{**cfg.__dict__, "stop": ()}), hook=full)
    assert full.steps == len("The") + 500  # the prime, then every generated character fed back
    hook = _counting_hook()
    lines = generate(model, vocab, cfg, hook=hook)
    assert len(lines) == 8 and all("\n" not in t and t.startswith("The") for t in lines)
    longest = max(len(t) for t in lines) - len("The")
    assert hook.steps == len("The") + longest < 100  # the prime, then one step per character of the longest line
    assert lines == [t.split("\n")[0] for t in long]  # the same seed: the same text, cut at its first newline
    kept = generate(model, vocab, SampleConfig(**{**cfg.__dict__, "stop_keep": True}))
    assert kept == [t + "\n" for t in lines]


def test_stop_streaming_pieces_join_to_the_generated_text(tiny_run):
    from charrnn.checkpoint import load_model
    from charrnn.sample import stream_chars

    model, vocab, _ = load_model(tiny_run)
    cfg = SampleConfig(temperature=1.0, length=300, seed=2, prime="A", stop=("ng ", "\n"), precision="fp32")
    pieces = [p[0] for p in stream_chars(model, vocab, cfg)]
    assert "A" + "".join(pieces) == generate(model, vocab, cfg)[0]
    assert len(pieces) < 300


# ---------------------------------------------------------------- the sample command: --stop, primes, echo


def _sample(run, *args, input=None):
    from typer.testing import CliRunner

    from charrnn.cli import app

    return CliRunner().invoke(app, ["sample", str(run), *map(str, args)], input=input, catch_exceptions=False)


def test_sample_stop_newline_num_8_prints_8_lines(tiny_run):
    r = _sample(tiny_run, "--stop", "\\n", "--num", "8", "--seed", "1", "--temp", "0.8")  # as a shell passes "\n"
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.split("\n")
    assert len(lines) == 9 and lines[-1] == ""  # 8 lines (one may be empty: a sample that stopped at once)
    j = _sample(tiny_run, "--stop", "\\n", "--num", "8", "--seed", "1", "--temp", "0.8", "--jsonl")
    texts = [json.loads(line)["text"] for line in j.stdout.splitlines()]
    assert texts == lines[:8]
    k = _sample(tiny_run, "--stop", "\\n", "--stop-keep", "--num", "8", "--seed", "1", "--temp", "0.8", "--jsonl")
    assert [json.loads(line)["text"] for line in k.stdout.splitlines()] == [t + "\n" for t in texts]


def test_sample_stop_streams_one_sample(tiny_run):
    r = _sample(tiny_run, "--stop", ".", "--stop", "\\n", "--prime", "The", "--seed", "3", "--length", "400")
    assert r.exit_code == 0, r.stderr
    text = r.stdout.removesuffix("\n")
    assert text.startswith("The") and "." not in text and "\n" not in text


def test_prime_file_stdin_and_no_echo_give_the_same_sample(tiny_run, tmp_path):
    args = ["--seed", "5", "--length", "40", "--temp", "0.8"]
    plain = _sample(tiny_run, "--prime", "The king", *args)
    assert plain.exit_code == 0 and plain.stdout.startswith("The king")
    f = tmp_path / "prime.txt"
    f.write_text("The king")
    assert _sample(tiny_run, "--prime-file", f, *args).stdout == plain.stdout
    assert _sample(tiny_run, "--prime", "-", *args, input="The king").stdout == plain.stdout
    quiet = _sample(tiny_run, "--prime-file", f, "--no-prime-echo", *args)
    assert quiet.exit_code == 0 and "The king" + quiet.stdout == plain.stdout
    many = _sample(tiny_run, "--prime", "The king", "--no-prime-echo", "--num", "2", "--jsonl", *args)
    assert all(not json.loads(line)["text"].startswith("The king") for line in many.stdout.splitlines())


@pytest.mark.parametrize("args,fragment", [
    (["--stop", ""], "--stop"),
    (["--stop", "\\n", "--stop", ""], "--stop"),
    (["--prime-file", "missing.txt"], "--prime-file"),
    (["--prime", "The", "--prime-file", "PRIME"], "not both"),
])
def test_sample_bad_input_is_one_line_exit_2(tiny_run, tmp_path, args, fragment):
    (tmp_path / "PRIME").write_text("The")
    r = _sample(tiny_run, *[str(tmp_path / a) if a == "PRIME" else a for a in args])
    assert r.exit_code == 2 and fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_sample_command_imports_neither_rich_nor_the_trainer(tmp_path):
    """What runs before the first character is what it needs: Rich (a tenth of a second) only for a
    warning or an error, the trainer and the neuron tools not at all (docs/speed.md, "First character")."""
    import subprocess
    import sys

    from charrnn import checkpoint as ckm

    m, v = _model()
    path = tmp_path / ckm.ckpt_name(0)
    ckm.save(path, {"model_config": m.config.to_dict(), "vocab": v.chars, "model": m.state_dict(),
                    "train": {"step": 0, "state": {}, "config": {}, "corpus": []}, "val_loss": None})
    probe = ("import sys; from charrnn.cli import app; app(['sample', sys.argv[1], '--length', '5', '--seed', '1'], "
             "standalone_mode=False); print(sorted(n for n in ('rich', 'charrnn.ui', 'charrnn.train', 'charrnn.neuron') "
             "if n in sys.modules), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 5 + 1  # 5 characters (the default prime is not echoed), the newline
    assert r.stderr.strip() == "[]"
