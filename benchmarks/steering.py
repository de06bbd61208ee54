"""Steering benchmark: do `--sentiment positive/negative` samples read as positive/negative to judges charrnn never saw?

Generates --num samples of --length characters with the sentiment unit fixed positive, fixed
negative, and free (spelling only the words of the model's corpus, as `sample` does by default;
--words any: freely); scores them, and real held-out reviews cut to the same length, with two
off-the-shelf judges (VADER and AFINN, lexicon-based, installed only for this benchmark:
`pip install vaderSentiment afinn`); reports the fraction judged positive, the model's loss on
held-out reviews with the unit free / fixed to the review's label / fixed to the opposite label,
the share of the samples' 20-grams found verbatim in the training text, and for every set (samples
and real reviews) its fluency:
- real words: the share of its words that occur at least 5 times in review text the model never
  trained on (--words-from; benchmarks/fluency.py defines a word),
- distinct 5-grams: distinct word 5-grams over all of them (low: the texts repeat themselves),
- soup: samples more than 10% of whose characters are rare in the training text (under 1 in 10,000),
- its loss (nats/char) under the model with the unit free (what the model itself finds likely; the
  unit-free samples are the reference, real reviews score higher since samples are drawn at --temp).

    python benchmarks/steering.py CHECKPOINT HELDOUT.tsv [--num 100] [--length 400] [--temp 0.8]
                                  [--words known|any] [--words-from TEXT ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from charrnn.sample import WORDS

from fluency import distinct_ngram_share, real_word_share, real_words

# --words-from's default, looked for beside HELDOUT.tsv: review text a run trained on the README or
# issue recipes (imdb_train_00-04, the other Amazon domains) never saw
WORDS_FROM = ("imdb_train_05.tsv", "imdb_train_06.tsv", "amazon_multidomain_books.tsv")
# held out for testing: nothing is chosen on them, the real-word vocabulary included
TEST_ONLY = ("sst2_test", "imdb_test_sample")
RARE_CHAR = 1e-4  # a character is rare if it is less than this share of the training text
SOUP = 0.10  # a sample is soup if more than this share of its characters are rare


def judges():
    from afinn import Afinn
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader, afinn = SentimentIntensityAnalyzer(), Afinn()
    return {"vader": lambda t: vader.polarity_scores(t)["compound"] >= 0.05, "afinn": lambda t: afinn.score(t) > 0}


def frac_positive(judge, texts: list[str]) -> float:
    return sum(bool(judge(t)) for t in texts) / len(texts)


@torch.no_grad()
def heldout_loss(model, vocab, texts: list[str], labels: list[int], rec: dict | None, mode: str) -> torch.Tensor:
    """Nats/char of each text (N,), stepping one character at a time with the unit free, matched or opposite."""
    from charrnn.neuron import hook_for

    ids = torch.tensor([[vocab.stoi["\n"]] + vocab.encode(t) for t in texts])  # (N, L+1), equal lengths
    hook = None
    if mode != "free":  # each row gets its own label's value (or the opposite one)
        pos = torch.tensor(labels) == (1 if mode == "matched" else 0)
        values = torch.where(pos, torch.tensor(float(rec["fix_values"]["positive"])), torch.tensor(float(rec["fix_values"]["negative"])))
        hook = hook_for(model, rec["unit"], values, rec["state"], rec["layer"])
    state = model.init_state(len(texts))
    total = torch.zeros(len(texts), dtype=torch.float64)
    for t in range(ids.shape[1] - 1):
        logits, state = model.step(ids[:, t], state, hook)
        total += torch.nn.functional.cross_entropy(logits.float(), ids[:, t + 1], reduction="none").double()
    return total / (ids.shape[1] - 1)


def ngram_share(samples: list[str], train_text: str, n: int = 20) -> float:
    wanted = {s[i : i + n] for s in samples for i in range(len(s) - n + 1)}
    found = set()
    for i in range(len(train_text) - n + 1):
        g = train_text[i : i + n]
        if g in wanted:
            found.add(g)
    total = [s[i : i + n] for s in samples for i in range(len(s) - n + 1)]
    return sum(g in found for g in total) / max(1, len(total))


def distinct_words(texts: list[str]) -> float:
    words = [w for t in texts for w in t.lower().split()]
    return len(set(words)) / max(1, len(words))


def common_chars(text: str) -> set[str]:
    counts = Counter(text)
    return {c for c, n in counts.items() if n >= RARE_CHAR * len(text)}


def soup_count(texts: list[str], common: set[str]) -> int:
    return sum(sum(c not in common for c in t) > SOUP * max(1, len(t)) for t in texts)


def words_from(args, ck) -> list[Path]:
    """The --words-from files, checked: they exist, and none is trained on, held out for testing or
    the real reviews themselves (any of those would count the model's own words as real)."""
    paths = [Path(p) for p in args.words_from] if args.words_from else [Path(args.heldout).parent / n for n in WORDS_FROM]
    trained = {Path(p).resolve() for p in ck["train"]["corpus"]}
    for p in paths:
        if not p.is_file():
            sys.exit(f"error: {p}: no such file; name review text the model never trained on with --words-from")
        if p.resolve() in trained or p.resolve() == Path(args.heldout).resolve():
            sys.exit(f"error: {p} is {'trained on' if p.resolve() in trained else 'HELDOUT'}; "
                     "name other review text with --words-from")
        if any(p.name.startswith(t) for t in TEST_ONLY):
            sys.exit(f"error: {p} is held out for testing; name other review text with --words-from")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("heldout", help="labeled TSV the model never trained on (real reviews and held-out loss)")
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--length", type=int, default=400)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loss-reviews", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples-out", help="write every sample as JSON lines here")
    ap.add_argument("--words", choices=WORDS, default="known",
                    help="as sample --words: known spells only the corpus's words (the checkpoint's list) [default: known]")
    ap.add_argument("--guidance", type=float, default=None, help="as sample --guidance [default: sample's, 0.25]")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as sample --precision")
    ap.add_argument("--value", type=float, help="fix the unit at +-VALUE (the positive side's sign) instead of the stored fix values")
    ap.add_argument("--words-from", nargs="+", metavar="TEXT",
                    help="review text (labeled TSV or plain) the model never trained on; its words seen 5+ times are the "
                         f"real words [default: {', '.join(WORDS_FROM)} beside HELDOUT]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from charrnn import neuron as sm
    from charrnn.checkpoint import load_model
    from charrnn.data import iter_corpus_text, read_labeled
    from charrnn.lexicon import Lexicon
    from charrnn.sample import SampleConfig, default_guidance, generate

    t0 = time.perf_counter()
    model, vocab, ck = load_model(args.checkpoint)
    lexicon = Lexicon.from_record(ck.get("lexicon"))
    if args.words == "known" and lexicon is None:
        print("this checkpoint keeps no word list (written before lexicons): the samples spell freely", file=sys.stderr)
    if args.guidance is None:  # what `sample --sentiment` does by default
        args.guidance = default_guidance(model, ck, "positive")  # the steered sets' (the free set runs unguided)
    rec = sm.get_record(ck)
    if args.value is not None:  # as `sample --sentiment S --value V`, with V's sign taken from the record
        side = 1.0 if rec["fix_values"]["positive"] >= rec["fix_values"]["negative"] else -1.0
        rec = {**rec, "fix_values": {"positive": side * abs(args.value), "negative": -side * abs(args.value)}}
        ck = {**ck, "sentiment": rec}
    judge = judges()
    vocabulary = real_words(t for p in words_from(args, ck) for t in iter_corpus_text(p))
    train_text = "".join("".join(iter_corpus_text(Path(p))) for p in ck["train"]["corpus"])
    common = common_chars(train_text)
    samples = {}
    for cond in ("positive", "negative", "none"):
        hook = None
        if cond != "none":
            hook, _ = sm.steering_hook(model, ck, cond, guided_rows=args.num if args.guidance > 0 else 0)
        cfg = SampleConfig(temperature=args.temp, length=args.length, seed=args.seed, num=args.num,
                           precision=args.precision, guidance=args.guidance if cond != "none" else 0.0,
                           words=args.words)
        samples[cond] = [t.lstrip("\n") for t in generate(model, vocab, cfg, hook=hook, lexicon=lexicon)]
    held = read_labeled(Path(args.heldout))
    known = set(vocab.chars)
    rng = random.Random(0)
    pairs = [(t[: args.length], y) for t, y in zip(held.texts, held.labels)
             if len(t) >= args.length and set(t[: args.length]) <= known]
    rng.shuffle(pairs)
    real = {"positive": [t for t, y in pairs if y == 1][: args.num], "negative": [t for t, y in pairs if y == 0][: args.num]}
    rows = []
    for name, texts in (("samples --sentiment positive", samples["positive"]),
                        ("samples --sentiment negative", samples["negative"]),
                        ("samples, unit free", samples["none"]),
                        ("real positive reviews", real["positive"]), ("real negative reviews", real["negative"])):
        cut = min(len(t) for t in texts)  # fluency: nats/char of the text under the model, unit free
        fluency = float(heldout_loss(model, vocab, [t[:cut] for t in texts], [0] * len(texts), rec, "free").mean())
        rows.append({"set": name, "n": len(texts), **{j: frac_positive(f, texts) for j, f in judge.items()},
                     "real_words": real_word_share(texts, vocabulary), "distinct_5grams": distinct_ngram_share(texts),
                     "soup": soup_count(texts, common), "distinct_words": distinct_words(texts), "free_model_loss": fluency})
    sep = {j: {"samples": rows[0][j] - rows[1][j], "real": rows[3][j] - rows[4][j]} for j in judge}
    lp = pairs[: args.loss_reviews]
    per_text = {m: heldout_loss(model, vocab, [t for t, _ in lp], [y for _, y in lp], rec, m)
                for m in ("free", "matched", "opposite")}
    losses = {m: float(v.mean()) for m, v in per_text.items()}
    # the unit as a generative classifier: is each review likelier with the unit fixed to its own label?
    gen_acc = float((per_text["matched"] < per_text["opposite"]).double().mean())
    overlap = {c: ngram_share(samples[c], train_text) for c in samples}
    real_overlap = ngram_share(real["positive"] + real["negative"], train_text)
    out = {"checkpoint": ck["path"], "unit": rec, "temp": args.temp, "words": args.words if lexicon else "any", "rows": rows, "separation": sep,
           "real_word_vocabulary": len(vocabulary), "heldout_loss": losses, "heldout_reviews": len(lp), "generative_accuracy": gen_acc, "ngram20_in_train": overlap,
           "ngram20_in_train_real": real_overlap, "seconds": time.perf_counter() - t0}
    out["unit"] = {k: v for k, v in rec.items() if k != "observed"}
    if args.samples_out:
        with open(args.samples_out, "w") as f:
            for c, ts in samples.items():
                for t in ts:
                    f.write(json.dumps({"condition": c, "text": t}, ensure_ascii=False) + "\n")
    print("| set | n | VADER positive | AFINN positive | real words | distinct 5-grams | soup | distinct words "
          "| loss under the free model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['n']} | {r['vader']:.0%} | {r['afinn']:.0%} | {r['real_words']:.3f} "
              f"| {r['distinct_5grams']:.3f} | {r['soup']} | {r['distinct_words']:.2f} | {r['free_model_loss']:.3f} |")
    for j, d in sep.items():
        print(f"{j}: positive minus negative: samples {d['samples']:+.0%}, real reviews {d['real']:+.0%}")
    print(f"held-out loss on {len(lp)} reviews ({args.length} chars, nats/char): unit free {losses['free']:.4f}, "
          f"fixed to its label {losses['matched']:.4f}, fixed to the opposite {losses['opposite']:.4f}; "
          f"likelier under their own label: {gen_acc:.1%}")
    print("20-grams found verbatim in the training text: " + ", ".join(f"{c} {v:.1%}" for c, v in overlap.items())
          + f"; real held-out reviews {real_overlap:.1%}")
    print(json.dumps(out), file=sys.stderr)


if __name__ == "__main__":
    main()
