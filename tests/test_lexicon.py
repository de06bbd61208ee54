"""The corpus's words (charrnn/lexicon.py): counted by a run, kept in its checkpoint and export, and
spelt by `sample --words known` (the default) in the CLI, the API and the server."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from charrnn import lexicon as lx
from charrnn.data import Vocab
from charrnn.lexicon import Lexicon, Speller
from charrnn.model import CharRNN, ModelConfig
from charrnn.sample import SampleConfig, generate
from conftest import cut_after, run_cli

TEXT = "The cat can't see the car. A dog, the dogs; CAT-car 42 cats\n" * 3


def test_words_are_lowercased_letter_runs_with_inner_apostrophes():
    assert lx.words("The cat can't see 'the' CAT-car, 42x cats.") == [
        "the", "cat", "can't", "see", "the", "cat", "car", "x", "cats"]


def test_a_known_word_occurs_min_count_times_and_once_per_million_characters():
    lex = Lexicon.count(["dog " * 2 + "cat " * 3])
    assert lex.words == ("cat",) and lex.min_count == lx.MIN_COUNT
    # 4,000,000 characters: a word needs 4 occurrences
    filler = "x" * (4_000_000 - 40)
    lex = Lexicon.count(["ant " * 4 + "bee " * 3 + "cow " * 3, filler])
    assert lex.min_count == 4 and lex.words == ("ant",)


def test_fine_tuning_keeps_the_words_read_before_after_the_new_corpus_words():
    new, before = Lexicon(("cat", "dog"), 3), Lexicon(("dog", "owl"), 5)
    assert new.merged(before) == Lexicon(("cat", "dog", "owl"), 3) and new.merged(None) is new


def test_the_lexicon_survives_its_record_and_a_malformed_record_reads_as_none():
    lex = Lexicon.count([TEXT])
    assert Lexicon.from_record(json.loads(json.dumps(lex.to_record()))) == lex
    assert Lexicon.from_record(None) is None
    assert Lexicon.from_record({"words": 3, "min_count": 3}) is None


def spelt(texts: list[str]) -> set[str]:
    """The words of the texts, less a word the length cut off (a text ending in a letter or apostrophe)."""
    out = set()
    for t in texts:
        ws = lx.words(t)
        out.update(ws[:-1] if t and (t[-1].isalpha() or t[-1] in lx.APOSTROPHES) else ws)
    return out


def _ids(vocab: Vocab, text: str) -> torch.Tensor:
    return torch.tensor(vocab.encode(text))


def test_the_speller_allows_only_continuations_of_known_words_and_boundaries_after_whole_ones():
    vocab = Vocab.from_text_chars(TEXT + "xq")
    lex = Lexicon(("cat", "car", "can't", "the"), 3)
    sp = Speller(lex, vocab.chars, 1)

    def allowed():
        return {c for c, ok in zip(vocab.chars, sp.tree.allowed[sp.node[0]].tolist()) if ok}

    letters = {c for c in vocab.chars if c.isalpha()}
    assert allowed() & letters == {"c", "C", "t", "T"}  # word starts
    for c in "ca":
        sp.feed(_ids(vocab, c))
    assert allowed() == {"t", "T", "r", "n"}  # "ca": no boundary yet
    sp.feed(_ids(vocab, "t"))
    assert " " in allowed() and "." in allowed() and not allowed() & letters  # "cat" is whole and ends here
    sp.feed(_ids(vocab, " "))
    assert sp.node.item() == 0
    for c in "can":
        sp.feed(_ids(vocab, c))
    assert allowed() == {"'"}  # only "can't" goes on from "can", and "can" is not a word
    # a word the lexicon lacks, read from a prime: anything goes until it ends
    sp2 = Speller(lex, vocab.chars, 1)
    for c in "xq":
        sp2.feed(_ids(vocab, c))
    assert sp2.node.item() == sp2.tree.free and bool(sp2.tree.allowed[sp2.tree.free].all())
    sp2.feed(_ids(vocab, " "))
    assert sp2.node.item() == 0


def test_every_word_of_a_large_list_walks_its_tree_and_every_non_word_leaves_it():
    # thousands of words sharing prefixes at every depth, some with a letter the vocabulary lacks
    # ("z"): the tree's edges, built from the sorted prefixes, must lead each word to a node where it
    # may end, and rule out the letter that would make a non-word at the first place it differs
    g = torch.Generator().manual_seed(0)
    letters = "abcdez'"
    found = {"".join(letters[i] for i in torch.randint(0, 6, (int(n),), generator=g).tolist())
             for n in torch.randint(1, 8, (4000,), generator=g)}
    wordlist = sorted(w for w in found if not w.startswith("'") and not w.endswith("'") and "''" not in w)
    vocab = Vocab.from_text_chars("abcde' \n")  # no "z": words with it cannot be spelt
    tree = Lexicon(tuple(wordlist), 3).tree(vocab.chars)
    known = set(wordlist)
    for w in wordlist:
        if "z" in w:
            continue
        node = 0
        for i, ch in enumerate(w):
            c = vocab.chars.index(ch)
            assert not tree.blocked[node, c], (w, i)
            node = int(tree.next_flat[node * tree.width + c])
            prefix = w[: i + 1]
            ends = not tree.blocked[node, vocab.chars.index(" ")]
            assert ends == (prefix in known), prefix  # a boundary only after a whole word
        assert node not in (0, tree.free)
    for probe in ("abcdeabcde", "eeeeeee", "dcba"):  # a letter no known word continues with is ruled out
        node = 0
        for i, ch in enumerate(probe):
            if not any(k.startswith(probe[: i + 1]) for k in known):
                assert tree.blocked[node, vocab.chars.index(ch)], probe[: i + 1]
                break
            node = int(tree.next_flat[node * tree.width + vocab.chars.index(ch)])


def test_restrict_masks_guided_shadow_rows_like_their_own_rows():
    vocab = Vocab.from_text_chars(TEXT)
    sp = Speller(Lexicon(("the",), 3), vocab.chars, 2)
    sp.feed(_ids(vocab, "tc"))  # sample 0 in "t", sample 1 in a word the lexicon lacks (as from a prime)
    out = sp.restrict(torch.zeros(4, len(vocab)))  # 2 samples and their 2 shadow rows
    finite = torch.isfinite(out)
    assert torch.equal(finite[:2], finite[2:]) and finite.sum(dim=1).tolist() == [1, len(vocab), 1, len(vocab)]
    assert vocab.chars[int(finite[0].nonzero())] == "h"


def test_an_untrained_model_spells_only_known_words_with_known_and_freely_with_any():
    vocab = Vocab.from_text_chars(TEXT)
    lex = Lexicon.count([TEXT])
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(len(vocab), "lstm", 1, 32)).eval()
    cfg = SampleConfig(temperature=1.0, length=300, seed=3, num=8)
    known = generate(model, vocab, cfg, lexicon=lex)
    assert sum(len(lx.words(t)) for t in known) > 50 and spelt(known) <= set(lex.words)
    free = generate(model, vocab, SampleConfig(temperature=1.0, length=300, seed=3, num=8, words="any"), lexicon=lex)
    assert not spelt(free) <= set(lex.words)
    # same seed, same text; and no lexicon (a checkpoint from before lexicons) samples freely
    assert generate(model, vocab, cfg, lexicon=lex) == known
    assert generate(model, vocab, cfg) == free


def test_guided_sampling_spells_known_words_too():
    vocab = Vocab.from_text_chars(TEXT)
    lex = Lexicon.count([TEXT])
    torch.manual_seed(1)
    model = CharRNN(ModelConfig(len(vocab), "lstm", 1, 16)).eval()

    def hook(layer, t, state):  # the own rows one way, the shadow rows the other (as steering_hook does)
        h, c = state
        c = c.clone()
        c[:4, 0], c[4:, 0] = 1.0, -1.0
        return h, c

    texts = generate(model, vocab, SampleConfig(temperature=1.0, length=200, seed=0, num=4, guidance=1.0),
                     hook=hook, lexicon=lex)
    assert spelt(texts) <= set(lex.words)


@pytest.fixture
def run(tmp_path):
    p = tmp_path / "words.txt"
    p.write_text(TEXT * 40)
    r = run_cli("train", p, "--steps", "2", "--hidden", "16", "--run", tmp_path / "run")
    assert r.exit_code == 0, r.output
    return tmp_path / "run"


def test_a_run_keeps_its_corpus_words_in_checkpoint_and_export_and_sampling_spells_them(run, tmp_path):
    import charrnn

    m = charrnn.load(run)
    assert m.lexicon is not None and {"cat", "car", "the", "can't", "dogs"} <= set(m.lexicon.words)
    texts = m.generate(num=4, length=300, seed=0, temperature=1.0)
    assert spelt(texts) <= set(m.lexicon.words)
    one = m.generate(length=300, seed=0, temperature=1.0)[0]
    assert "".join(m.stream(length=300, seed=0, temperature=1.0)) == one
    r = run_cli("sample", run, "--seed", "0", "--length", "300", "--temp", "1", "--num", "4", "--jsonl")
    assert r.exit_code == 0 and [json.loads(x)["text"] for x in r.stdout.splitlines()] == texts
    r = run_cli("sample", run, "--seed", "0", "--length", "300", "--temp", "1", "--words", "any")
    assert r.exit_code == 0 and r.stdout.rstrip("\n") == m.generate(length=300, seed=0, temperature=1.0, words="any")[0]
    assert r.stdout.rstrip("\n") != one
    assert run_cli("export", run, "-o", tmp_path / "exp").exit_code == 0
    assert (tmp_path / "exp" / "words.txt").read_text().splitlines()[0] == f"min_count {m.lexicon.min_count}"
    assert charrnn.load(tmp_path / "exp").lexicon == m.lexicon
    assert charrnn.load(tmp_path / "exp").generate(num=4, length=300, seed=0, temperature=1.0) == texts


def test_bad_words_value_and_a_damaged_word_list_are_one_line_errors(run, tmp_path):
    r = run_cli("sample", run, "--words", "some")
    assert r.exit_code == 2 and "--words" in r.output
    assert run_cli("export", run, "-o", tmp_path / "exp").exit_code == 0
    (tmp_path / "exp" / "words.txt").write_text("the\ncat\n")
    r = run_cli("sample", tmp_path / "exp")
    assert r.exit_code == 1 and "words.txt is not an export's word list" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_resumed_run_keeps_its_words_and_an_old_checkpoint_gets_them_counted(tmp_path):
    from charrnn import checkpoint as ckm
    from charrnn.train import Trainer

    p = tmp_path / "words.txt"
    p.write_text(TEXT * 40)
    assert run_cli("train", p, "--steps", "4", "--eval-every", "2", "--keep", "10", "--hidden", "16",
                   "--run", tmp_path / "run").exit_code == 0
    words = ckm.load(tmp_path / "run" / ckm.ckpt_name(4))["lexicon"]
    for name, drop in (("cut", False), ("old", True)):  # killed after step 2; and the same from before lexicons
        cut = tmp_path / name
        shutil.copytree(tmp_path / "run", cut)
        cut_after(cut, 2)
        if drop:
            path = cut / ckm.ckpt_name(2)
            old = ckm.load(path)
            old.pop("lexicon")
            ckm.save(path, old)
        Trainer.resume(cut).run()
        assert ckm.load(cut / ckm.ckpt_name(4))["lexicon"] == words, name
