"""`charrnn sample`: text from a checkpoint, streamed to stdout, optionally steered by one unit."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli import startup
from charrnn.cli.errors import handle_errors
from charrnn.cli.options import HOME, Device, Precision, RunDevice, Sentiment, StateKind, Words


@handle_errors
def sample(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint or run folder \\[default: the latest run's best].", show_default=False)] = None,
    temp: Annotated[float, typer.Option("--temp", "--temperature", help="Temperature; 0 = greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely characters; 0 = all.")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample from the smallest set reaching probability p; 1 = all.")] = 1.0,
    length: Annotated[int, typer.Option(help="Characters to generate after the prime (one sample streams in constant memory, any length; --num N and --jsonl hold the texts).")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (printed before the sample unless --no-prime-echo); - reads it from standard input.")] = "",
    prime_file: Annotated[Optional[Path], typer.Option(help="Read the text to start from from this UTF-8 file (instead of --prime).", show_default=False)] = None,
    no_prime_echo: Annotated[bool, typer.Option("--no-prime-echo", help="Print only the generated text, not the prime.")] = False,
    stop: Annotated[Optional[list[str]], typer.Option(metavar="<str>", help="End each sample at its first match of this text, e.g. --stop '\\n' (repeatable; \\n, \\t and \\\\ are newline, tab, backslash); generation ends when every sample has.", show_default=False)] = None,
    stop_keep: Annotated[bool, typer.Option("--stop-keep", help="Keep the matched --stop text at the end of the sample \\[default: cut it off].")] = False,
    words: Annotated[Words, typer.Option(help="known = spell only words the model read in its corpus (often enough to trust; the list is kept in checkpoints), any = whatever the model spells.")] = Words.known,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same text.")] = None,
    num: Annotated[int, typer.Option(help="Number of samples.")] = 1,
    jsonl: Annotated[bool, typer.Option("--jsonl", help='One JSON object per sample: {"text": ...}.')] = False,
    device: RunDevice = Device.cpu,
    dir: Annotated[Path, typer.Option("--dir", help="Where runs live, when no checkpoint is named.")] = HOME,
    sentiment: Annotated[Optional[Sentiment], typer.Option(help="Fix the checkpoint's sentiment unit at its positive or negative value, every step (guided by 1 for a unit bound by train --sentiment-unit, 0.25 for a found one, unless --guidance says otherwise).", show_default=False)] = None,
    neuron: Annotated[Optional[int], typer.Option(min=0, help="Fix this top-layer unit (with --value).", show_default=False)] = None,
    value: Annotated[Optional[float], typer.Option(help="The value --neuron is fixed at (with --sentiment: instead of the stored one).", show_default=False)] = None,
    state: Annotated[Optional[StateKind], typer.Option(help="State fixed: c (cell) or h (hidden) \\[default: c for LSTM-like cells, h for GRU/RNN].", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(min=0.0, help="With --sentiment or --neuron: also run each sample with the unit fixed the opposite way and draw from log p_own + G * (log p_own - log p_opposite) among the characters the own stream finds plausible; 0 = plain fixing \\[default with --sentiment: 1 for a unit bound by train --sentiment-unit, 0.25 for a found one; else 0].", show_default=False)] = None,
    precision: Annotated[Precision, typer.Option(help="Weights and states while sampling: auto = the faster of fp32 and bf16, timed on this model and batch once and cached per machine (on a CPU without native bf16 only for models of 1M+ parameters); fp32 on a GPU.")] = Precision.auto,
):
    """Generate text from a checkpoint. Text goes to stdout as it is generated."""
    # Only what the first character needs is imported (not the trainer, not Rich unless there is
    # something to warn about): it comes that much sooner (docs/speed.md, "First character").
    from charrnn.config import check_finite
    from charrnn.api import load
    from charrnn.data import Vocab
    from charrnn.sample import SampleConfig, clean_prime, default_guidance, generate, stream_chars, validate

    check_finite(value=value)
    guidance_given = guidance is not None  # else it depends on the model: set once it is loaded
    guidance = guidance or 0.0
    prime = read_prime(prime, prime_file)
    cfg = SampleConfig(temperature=temp, top_k=top_k, top_p=top_p, length=length, prime=prime, seed=seed, num=num,
                       precision=precision.value, guidance=guidance, stop=tuple(unescape(s) for s in stop or ()),
                       stop_keep=stop_keep, words=words.value)
    validate(cfg)
    m = load(checkpoint, device.value, home=dir, on_warn=_warn)
    model, vocab, ck = m.module, Vocab(m.vocab), m.checkpoint
    startup.settle()  # loaded: the rest is the first character's (startup.py)
    if not guidance_given:
        guidance = default_guidance(model, ck, sentiment)
        cfg = dataclasses.replace(cfg, guidance=guidance)
    hook = None
    if sentiment is not None or neuron is not None or value is not None or state is not None or guidance > 0:
        from charrnn.neuron.steer import steering_hook

        hook, _ = steering_hook(model, ck, sentiment.value if sentiment else None, neuron, value,
                                state.value if state else None, guided_rows=num if guidance > 0 else 0)
    kept, unknown = clean_prime(prime, vocab)
    if unknown:
        _warn(f"the prime has characters this model never saw, skipped: {unknown!r}")
    cfg.prime = kept
    echo = "" if no_prime_echo else kept
    stream = num == 1 and not jsonl
    if stream:
        sys.stdout.write(echo)
        sys.stdout.flush()
        for chars in stream_chars(model, vocab, cfg, hook=hook, lexicon=m.lexicon):  # nothing kept: --length can be any size
            sys.stdout.write(chars[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    texts = [echo + t[len(kept):] for t in generate(model, vocab, cfg, hook=hook, lexicon=m.lexicon)]
    one_line = not any("\n" in t for t in texts)  # as --stop '\n' makes them: one per line, no blank lines between
    for i, t in enumerate(texts):
        if jsonl:
            sys.stdout.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(("\n" if i and not one_line else "") + t + "\n")
    sys.stdout.flush()


def read_prime(prime: str, prime_file: Path | None) -> str:
    """The prime: --prime's text, standard input for --prime -, or --prime-file's content."""
    from charrnn.errors import UsageError

    if prime_file is not None:
        if prime:
            raise UsageError("give --prime or --prime-file, not both")
        if not Path(prime_file).is_file():
            raise UsageError(f"--prime-file {prime_file}: no such file; name a UTF-8 text file to start from")
        from charrnn.data import iter_text

        return "".join(iter_text(Path(prime_file)))
    if prime == "-":
        return sys.stdin.read()
    return prime


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """--stop's text with \\n, \\t, \\r and \\\\ read as newline, tab, return and backslash (a shell passes them
    as two characters); any other backslash stays as it is."""
    import re

    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text)


def _warn(message: str) -> None:
    from charrnn import ui  # Rich costs a tenth of a second to import: only when there is a warning

    ui.warn(message)
