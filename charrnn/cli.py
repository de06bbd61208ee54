"""The `charrnn` command line: parse options, call one library function, render the result.

torch is imported inside the commands, so `charrnn --help` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn import __version__
from charrnn.cli_cache import cache_app
from charrnn.cli_corpus import corpus_app
from charrnn.cli_errors import handle_errors
from charrnn.cli_neuron import StateKind, neuron_app
from charrnn.config import SentimentConfig

app = typer.Typer(
    help="Train character-level recurrent language models, sample from them, and steer them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
checkpoints_app = typer.Typer(help="List, inspect, prune and upgrade runs and their checkpoints.", no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")
app.add_typer(corpus_app, name="corpus")
app.add_typer(cache_app, name="cache")
app.add_typer(neuron_app, name="neuron")

HOME = Path("checkpoints")


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"
    rnn = "rnn"
    peephole = "peephole"
    coupled = "coupled"
    mlstm = "mlstm"


class Sentiment(str, Enum):
    positive = "positive"
    negative = "negative"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


def _version(value: bool):
    if value:
        print(f"charrnn {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """Train character-level recurrent language models, sample from them, and steer them."""


# ---------------------------------------------------------------- train


@app.command()
@handle_errors
def train(
    corpus: Annotated[Optional[list[Path]], typer.Argument(help="Text files (or labeled label<TAB>text TSV), read in order.", show_default=False)] = None,
    cell: Annotated[Cell, typer.Option(help="Recurrent cell.")] = Cell.lstm,
    layers: Annotated[Optional[int], typer.Option(min=1, help="Stacked layers \\[default: 2].", show_default=False)] = None,
    hidden: Annotated[Optional[int], typer.Option(min=1, help="Units per layer \\[default: chosen from the time budget and corpus].", show_default=False)] = None,
    embed: Annotated[int, typer.Option(min=0, help="Embedding width; 0 = same as --hidden.")] = 0,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Dropout \\[default: from the expected passes over the corpus: 0 to 0.3].", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Characters per backprop-through-time window \\[default: 64 on a CPU, 128 on a GPU].", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Parallel streams \\[default: 32 on a CPU, 128 on CUDA].", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate \\[default: 5e-3 at 256 units, times sqrt(256/hidden)].", show_default=False)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(min=0.0, help="Global gradient-norm clip, 0 = off \\[default: 1.0].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed \\[default: 1337].", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Train for this many steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Train for this many passes over the corpus.")] = None,
    time: Annotated[Optional[str], typer.Option("--time", help="Wall-clock budget (90s, 5m, 1h): train, evaluate, save, exit 0.")] = None,
    val_frac: Annotated[Optional[float], typer.Option(help="Last fraction held out for validation \\[default: 0.1].", show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="Steps between evaluations and saves \\[default: about 10 per run].", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option(min=1, help="Newest checkpoints kept besides the best \\[default: 1].", show_default=False)] = None,
    patience: Annotated[Optional[int], typer.Option(min=0, help="Stop after this many evaluations without a better validation loss; 0 = never \\[default: 5 for a time budget, 0 with --steps/--epochs].", show_default=False)] = None,
    run: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help="Run folder (--run-dir is the same; use it under torchrun, whose parser takes --run for its own --run-path) \\[default: a new folder under ./checkpoints].", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder exactly where it stopped.")] = None,
    allow_changed_corpus: Annotated[bool, typer.Option("--allow-changed-corpus", help="With --resume: go on although a corpus file's content changed since the run started.")] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Start a new run from this checkpoint's weights.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads \\[default: PyTorch's].", show_default=False)] = None,
    encoding_errors: Annotated[Optional[str], typer.Option(help="'replace' to train on a file with invalid UTF-8 \\[default: strict].", show_default=False)] = None,
    sentiment_unit: Annotated[bool, typer.Option("--sentiment-unit", help="Bind unit 0 of the top layer to the labels of a labeled TSV corpus, for sample --sentiment.")] = False,
    sentiment_contrast: Annotated[Optional[float], typer.Option(min=0.0, help=f"With --sentiment-unit: weight of the loss asking fixed reviews to be likelier under their own label than the opposite one \\[default: {SentimentConfig.contrast}].", show_default=False)] = None,
    sentiment_fixed: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help=f"With --sentiment-unit: share of reviews whose unit is fixed to their label \\[default: {SentimentConfig.fixed}].", show_default=False)] = None,
    sentiment_forced: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, hidden=True, help="The old name of --sentiment-fixed.")] = None,
    sentiment_read: Annotated[Optional[int], typer.Option(min=0, help=f"With --sentiment-unit: a reading pass of N labeled texts per step, the loss after each one's last character, instead of a loss at every character of free reviews \\[default: {SentimentConfig.read}].", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
):
    """Train a model on CORPUS (or continue one with --resume RUN_DIR)."""
    from charrnn import ui
    from charrnn.config import TrainConfig, parse_duration
    from charrnn.errors import UsageError
    from charrnn.train import Trainer

    display = ui.TrainDisplay(quiet=quiet)
    if resume is not None:
        if corpus:
            raise UsageError("--resume continues a run on its own corpus; leave out the CORPUS argument")
        trainer = Trainer.resume(resume, callback=display, threads=threads,
                                 device=device.value if device != Device.auto else None,
                                 allow_changed_corpus=allow_changed_corpus)
    else:
        if allow_changed_corpus:
            raise UsageError("--allow-changed-corpus goes with --resume RUN_DIR")
        if not corpus:
            raise UsageError("name a corpus file to train on (or --resume RUN_DIR)")
        from charrnn.corpora import expand_corpus_args

        corpus = expand_corpus_args(corpus)  # patterns a shell passed unexpanded
        given = dict(
            layers=layers, hidden=hidden, dropout=dropout, seq_len=seq_len, batch_size=batch_size, lr=lr,
            grad_clip=grad_clip, seed=seed, steps=steps, epochs=epochs, val_frac=val_frac, eval_every=eval_every,
            keep=keep, patience=patience, threads=threads, encoding_errors=encoding_errors,
        )
        cfg = TrainConfig(cell=cell.value, embed=embed, device=device.value,
                          sentiment=_sentiment_config(sentiment_unit, sentiment_contrast, sentiment_fixed,
                                                      sentiment_forced, sentiment_read),
                          **{k: v for k, v in given.items() if v is not None})
        if time is not None:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "time_s": parse_duration(time)})  # the config is frozen
        trainer = Trainer.new(corpus, cfg, run_dir=run, init_from=init_from, home=HOME, callback=display)
    # The Trainer takes SIGINT/SIGTERM while it runs and hands them back when its last save is on
    # disk. One that comes after that (the run is complete) must not kill the process on its way
    # out: it is ignored from here on, and main() ends the process without Python's shutdown, during
    # which the default handlers are back (measured: a SIGINT 0.1 s after the last save ended the
    # process with -2 and nothing printed).
    import signal

    global _EXIT_WITHOUT_SHUTDOWN
    if _OWN_PROCESS:  # not when the app runs inside another program (tests, notebooks)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        _EXIT_WITHOUT_SHUTDOWN = True
    try:
        summary = trainer.run()
    finally:
        display.close()
    if summary["reason"] == "interrupted":
        raise typer.Exit(130 if summary.get("signal") == 2 else 143)


def _sentiment_config(unit: bool, contrast: float | None, fixed: float | None, forced: float | None,
                      read: int | None):
    """The --sentiment-* options as a SentimentConfig (options not given keep its defaults)."""
    from charrnn.errors import UsageError

    if forced is not None:
        if fixed is not None:
            raise UsageError("--sentiment-forced is the old name of --sentiment-fixed; give only --sentiment-fixed")
        fixed = forced
    given = {"contrast": contrast, "fixed": fixed, "read": read}
    if not unit and any(v is not None for v in given.values()):
        raise UsageError("--sentiment-contrast, --sentiment-fixed and --sentiment-read tune --sentiment-unit; add --sentiment-unit")
    return SentimentConfig(unit=unit, **{k: v for k, v in given.items() if v is not None})


# ---------------------------------------------------------------- sample


@app.command()
@handle_errors
def sample(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint or run folder \\[default: the latest run's best].", show_default=False)] = None,
    temp: Annotated[float, typer.Option("--temp", "--temperature", help="Temperature; 0 = greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely characters; 0 = all.")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample from the smallest set reaching probability p; 1 = all.")] = 1.0,
    length: Annotated[int, typer.Option(help="Characters to generate after the prime (one sample streams in constant memory, any length; --num N and --jsonl hold the texts).")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (included in the output).")] = "",
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same text.")] = None,
    num: Annotated[int, typer.Option(help="Number of samples.")] = 1,
    jsonl: Annotated[bool, typer.Option("--jsonl", help='One JSON object per sample: {"text": ...}.')] = False,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.cpu,
    dir: Annotated[Path, typer.Option("--dir", help="Where runs live, when no checkpoint is named.")] = HOME,
    sentiment: Annotated[Optional[Sentiment], typer.Option(help="Fix the checkpoint's sentiment unit at its positive or negative value, every step (guided by 0.25 unless --guidance says otherwise).", show_default=False)] = None,
    neuron: Annotated[Optional[int], typer.Option(min=0, help="Fix this top-layer unit (with --value).", show_default=False)] = None,
    value: Annotated[Optional[float], typer.Option(help="The value --neuron is fixed at (with --sentiment: instead of the stored one).", show_default=False)] = None,
    state: Annotated[Optional[StateKind], typer.Option(help="State fixed: c (cell) or h (hidden) \\[default: c for LSTM-like cells, h for GRU/RNN].", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(min=0.0, help="With --sentiment or --neuron: also run each sample with the unit fixed the opposite way and draw from own + G * (own - opposite) logits; 0 = plain fixing \\[default: 0.25 with --sentiment, else 0].", show_default=False)] = None,
    precision: Annotated[Precision, typer.Option(help="Weights and states while sampling: auto = bf16 on a CPU with native bf16 for models of 2M+ parameters or 16+ streams, else fp32.")] = Precision.auto,
):
    """Generate text from a checkpoint. Text goes to stdout as it is generated."""
    from charrnn import ui
    from charrnn.config import check_finite
    from charrnn.sample import SENTIMENT_GUIDANCE, SampleConfig, clean_prime, generate, stream_chars, validate
    from charrnn.checkpoint import load_model
    from charrnn.train import pick_device

    check_finite(value=value)
    if guidance is None:
        guidance = SENTIMENT_GUIDANCE if sentiment is not None else 0.0
    cfg = SampleConfig(temperature=temp, top_k=top_k, top_p=top_p, length=length, prime=prime, seed=seed, num=num,
                       precision=precision.value, guidance=guidance)
    validate(cfg)
    model, vocab, ck = load_model(checkpoint, pick_device(device.value), home=dir, on_warn=ui.warn)
    from charrnn.neuron.steer import steering_hook

    hook, _ = steering_hook(model, ck, sentiment.value if sentiment else None, neuron, value,
                            state.value if state else None, guided_rows=num if guidance > 0 else 0)
    kept, unknown = clean_prime(prime, vocab)
    if unknown:
        ui.warn(f"the prime has characters this model never saw, skipped: {unknown!r}")
    cfg.prime = kept
    stream = num == 1 and not jsonl
    if stream:
        from charrnn.sample import default_prime

        sys.stdout.write(kept or default_prime(vocab))
        sys.stdout.flush()
        for chars in stream_chars(model, vocab, cfg, hook=hook):  # nothing kept: --length can be any size
            sys.stdout.write(chars[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    texts = generate(model, vocab, cfg, hook=hook)
    for i, t in enumerate(texts):
        if jsonl:
            sys.stdout.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(("\n" if i else "") + t + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- eval


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run folder.")],
    file: Annotated[Path, typer.Argument(help="Text file to score.")],
    json_out: Annotated[bool, typer.Option("--json", help='Print {"loss", "bpc", "chars"} as JSON.')] = False,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.cpu,
    precision: Annotated[Precision, typer.Option(help="Weights and states: fp32, bf16 (what bf16 sampling costs in loss), or auto (as sample chooses for one stream).")] = Precision.fp32,
):
    """Loss of a checkpoint on a text file, in nats and bits per character."""
    import math

    from charrnn import ui
    from charrnn.checkpoint import load_model
    from charrnn.data import load_corpus
    from charrnn.train import evaluate, pick_device

    dev = pick_device(device.value)
    model, vocab, ck = load_model(checkpoint, dev, home=HOME, on_warn=ui.warn)
    data, _ = load_corpus([file], vocab=vocab)
    from charrnn.sample import choose_precision, with_precision

    model = with_precision(model, choose_precision(model, precision.value, 1))
    loss, chars = evaluate(model, data, device=dev)
    if json_out:
        print(json.dumps({"loss": loss, "bpc": loss / math.log(2), "chars": chars}))
    else:
        ui.info(f"{ck['path']} on {file}: {chars:,} chars")
        print(f"loss {loss:.4f} nats/char  bpc {loss / math.log(2):.4f}")


# ---------------------------------------------------------------- gradients


@app.command()
@handle_errors
def gradients(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run folder.")],
    file: Annotated[Path, typer.Argument(help="Text file to take the stretches of text from.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Steps back: K in k = 1..K.")] = 50,
    windows: Annotated[int, typer.Option(min=1, help="Stretches of text averaged over.")] = 16,
    json_out: Annotated[bool, typer.Option("--json", help='Print {"k": [...], "norms": [[...] per layer], ...} as JSON.')] = False,
    device: Annotated[Device, typer.Option(help="Where to run.")] = Device.cpu,
):
    """Gradient flow through time: |d loss at the last step / d h k steps back|, k = 1..K, per layer."""
    from charrnn import ui
    from charrnn.checkpoint import load_model
    from charrnn.data import load_corpus
    from charrnn.gradients import gradient_flow
    from charrnn.train import pick_device

    model, vocab, ck = load_model(checkpoint, pick_device(device.value), home=HOME, on_warn=ui.warn)
    data, _ = load_corpus([file], vocab=vocab)
    result = gradient_flow(model, data, k=k, windows=windows)
    if json_out:
        print(json.dumps(result))
    else:
        mc = ck["model_config"]
        ui.gradient_flow_table(f"{ck['path']}: {mc['cell']} {mc['layers']}x{mc['hidden']} on {file}", result)


# ---------------------------------------------------------------- checkpoints


def _run_rows(home: Path) -> list[dict]:
    import time as _time

    from charrnn import checkpoint as ck
    from charrnn import ui

    rows = []
    for run_dir in ck.list_runs(home):
        infos = ck.list_checkpoints(run_dir, verify_all=True, on_warn=ui.warn)
        best = ck.best_of(infos)
        cell, size = "-", "-"
        meta = {}
        if infos:
            try:
                meta = json.loads(ck.sidecar(infos[-1].path).read_text())
            except (OSError, ValueError):
                meta = {}
        cell = meta.get("cell", "-")
        size = f"{meta['layers']}x{meta['hidden']}" if "layers" in meta else "-"
        disk = sum(p.stat().st_size for p in run_dir.iterdir() if p.is_file())
        updated = max((i.saved_at for i in infos), default=run_dir.stat().st_mtime)
        rows.append({
            "run": str(run_dir), "cell": cell, "size": size, "checkpoints": len(infos),
            "last_step": infos[-1].step if infos else 0, "best": best.val_loss if best else None,
            "best_path": str(best.path) if best else None, "disk": disk,
            "updated": _time.strftime("%Y-%m-%d %H:%M", _time.localtime(updated)),
        })
    return rows


@checkpoints_app.command("list")
@handle_errors
def checkpoints_list(
    dir: Annotated[Path, typer.Option("--dir", help="Folder holding run folders.")] = HOME,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per run on stdout.")] = False,
):
    """The runs under ./checkpoints (or --dir): checkpoints, last step, best validation loss, disk."""
    from charrnn import ui
    from charrnn.errors import CheckpointError

    if not dir.is_dir():
        raise CheckpointError(f"no run folder {dir.resolve()}; train a model first with 'charrnn train CORPUS'")
    rows = _run_rows(dir)
    if json_out:
        for r in rows:
            print(json.dumps(r))
        return
    if not rows:
        ui.info(f"no runs in {dir.resolve()}")
        return
    ui.runs_table(rows)


@checkpoints_app.command("show")
@handle_errors
def checkpoints_show(
    path: Annotated[Path, typer.Argument(help="A run folder or a checkpoint file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the details as JSON on stdout.")] = False,
):
    """Details of a run or checkpoint: model, training settings, progress, vocabulary, files."""
    import math

    from charrnn import checkpoint as ckm
    from charrnn import ui

    target, ck = ckm.open_checkpoint(path, on_warn=ui.warn)
    ckm.check_payload(ck, target, train=True)
    mc, tr = ck["model_config"], ck["train"]
    st = tr["state"]
    params = sum(v.numel() for v in ck["model"].values())
    details = {
        "checkpoint": str(target), "step": tr["step"], "val_loss": ck.get("val_loss"),
        "best_val_loss": st.get("best_val_loss"), "best_step": st.get("best_step"),
        "model": mc, "params": params, "train": tr["config"], "corpus": tr["corpus"],
        "elapsed_s": st.get("elapsed_s"), "total_steps": st.get("total_steps"), "vocab_size": len(ck["vocab"]),
        "versions": ck.get("versions"), "sentiment": ck.get("sentiment"),
    }
    if json_out:
        print(json.dumps(details, default=str))
        return
    vl = ck.get("val_loss")
    rows = [
        ("checkpoint", str(target)),
        ("model", f"{mc['cell']} {mc['layers']}x{mc['hidden']}, embed {mc['embed'] or mc['hidden']}, "
                  f"dropout {mc['dropout']}, {params / 1e6:.2f}M params"),
        ("step", f"{tr['step']} of {st.get('total_steps')}"),
        ("val loss", "-" if vl is None else f"{vl:.4f} nats/char ({vl / math.log(2):.4f} bpc)"),
        ("best in run", "-" if st.get("best_val_loss") is None else f"{st['best_val_loss']:.4f} at step {st['best_step']}"),
        ("trained for", ui.fmt_duration(st.get("elapsed_s"))),
        ("corpus", ", ".join(tr["corpus"])),
        ("vocabulary", f"{len(ck['vocab'])} characters"),
        ("settings", ", ".join(f"{k}={v}" for k, v in tr["config"].items() if v is not None)),
        ("versions", ", ".join(f"{k} {v}" for k, v in (ck.get("versions") or {}).items())),
    ]
    if target.suffix == ckm.LEGACY_SUFFIX:
        rows.append(("format", f"old .pt file; 'charrnn checkpoints upgrade {path}' rewrites it as .safetensors"))
    if ck.get("sentiment"):
        s = ck["sentiment"]
        rows.append(("sentiment unit", f"unit {s.get('unit')} (polarity {s.get('polarity')})"))
    ui.kv_table("checkpoint", rows)
    if path.is_dir():
        infos = ckm.list_checkpoints(path, verify_all=True, on_warn=ui.warn)
        best = ckm.best_of(infos)
        ui.checkpoints_table(str(path), [
            {"file": i.path.name, "step": i.step, "val_loss": i.val_loss, "size": i.size,
             "mark": "best" if best and i.path == best.path else ("latest" if i is infos[-1] else "")}
            for i in infos])


@checkpoints_app.command("prune")
@handle_errors
def checkpoints_prune(
    dir: Annotated[Path, typer.Option("--dir", help="Folder holding run folders, or one run folder.")] = HOME,
    keep: Annotated[int, typer.Option(min=1, help="Newest checkpoints kept per run, besides the best.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
):
    """Delete all but the best and the newest --keep checkpoints of every run (a run being trained is left alone)."""
    from charrnn import checkpoint as ckm
    from charrnn import ui
    from charrnn.errors import CheckpointError
    from charrnn.runlock import RunLock, holder

    if not dir.is_dir():
        raise CheckpointError(f"no folder {dir.resolve()}")
    runs = [dir] if ckm.is_run_dir(dir) else ckm.list_runs(dir)
    freed, count, done = 0, 0, 0
    for run_dir in runs:
        lock = RunLock(run_dir, "checkpoints prune")
        try:  # the run's lock while pruning it, so no training starts or saves meanwhile
            busy = holder(run_dir) if dry_run else lock.try_acquire()
        except OSError:
            busy = None  # a read-only folder: nothing can train there; rotate says what it cannot delete
        if busy is not None:
            ui.info(f"skipped: {busy}; prune it when that ends")
            continue
        try:
            removed = ckm.rotate(run_dir, keep, dry_run=dry_run, on_warn=ui.warn)
            if not dry_run:
                ckm.clean_temp_files(run_dir)
        finally:
            lock.release()
        freed += sum(i.size for i in removed)
        count += len(removed)
        done += 1
    verb = "would delete" if dry_run else "deleted"
    ui.info(f"{verb} {count} checkpoint(s) in {done} run(s), {ui.fmt_size(freed)}")


@checkpoints_app.command("upgrade")
@handle_errors
def checkpoints_upgrade(
    path: Annotated[Path, typer.Argument(help="A .pt checkpoint, a run folder, or a folder of run folders.")],
):
    """Rewrite old .pt checkpoints as checksummed .safetensors; each .pt goes once its new file reads back the same."""
    from charrnn import checkpoint as ckm
    from charrnn import ui
    from charrnn.errors import CheckpointError

    if not path.exists():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    if path.is_file():
        files = [path]
    else:
        runs = [path] if ckm.is_run_dir(path) else ckm.list_runs(path)
        files = [p for run_dir in runs for p in sorted(run_dir.glob(ckm.LEGACY_GLOB))]
    if not files:
        ui.info(f"no .pt checkpoints to upgrade in {path}")
        return
    failed = []
    for p in files:
        try:
            new = ckm.upgrade(p, on_warn=ui.warn)
        except CheckpointError as e:
            ui.warn(str(e))
            failed.append(p)
            continue
        ui.info(f"upgraded {p} -> {new.name}")
    if failed:
        raise CheckpointError(f"{len(failed)} of {len(files)} checkpoint(s) could not be upgraded (see above); "
                              "the others are upgraded")


# ---------------------------------------------------------------- bench


@app.command()
@handle_errors
def bench(
    sections: Annotated[str, typer.Option(help="Comma-separated: train, sample, startup, big, quality, processes.")] = "train,sample,startup",
    steps: Annotated[int, typer.Option(min=2, help="Timed training steps per measurement.")] = 40,
    rounds: Annotated[int, typer.Option(min=1, help="Raw/charrnn alternations per training shape (medians reported).")] = 2,
    shapes: Annotated[str, typer.Option(help="Training shapes, CELLxLAYERSxHIDDEN, comma-separated.")] = "lstm2x256,lstm2x512,gru2x512",
    seq_len: Annotated[int, typer.Option(min=1, help="Training sequence length.")] = 100,
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size.")] = 32,
    sample_hidden: Annotated[int, typer.Option(min=1, help="Width of the 2-layer LSTM used for sampling.")] = 512,
    sample_length: Annotated[int, typer.Option(min=10, help="Characters generated per sampling measurement.")] = 2000,
    num: Annotated[int, typer.Option(min=2, help="Streams for the batched sampling measurement.")] = 64,
    big_mb: Annotated[int, typer.Option(min=1, help="Size of the synthetic corpus for the 'big' section, in MB.")] = 500,
    quality_corpus: Annotated[Path, typer.Option(help="Corpus for the 'quality' section ('charrnn corpus get tinyshakespeare' puts it there).")] = Path("corpora/tinyshakespeare.txt"),
    quality_budget: Annotated[str, typer.Option(help="Time budget for the 'quality' section.")] = "5m",
    workdir: Annotated[Path, typer.Option(help="Scratch folder for the big and quality sections.")] = Path("bench-work"),
    device: Annotated[str, typer.Option(help="Device for the 'train' section: cpu or cuda (mixed precision on both sides).")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per measured row on stdout.")] = False,
):
    """Measure charrnn against raw PyTorch loops at the same shapes, side by side, and print ratios."""
    import re

    from charrnn import bench as b
    from charrnn import ui
    from charrnn.errors import UsageError

    wanted = [s.strip() for s in sections.split(",") if s.strip()]
    known = {"train", "sample", "startup", "big", "quality", "processes"}
    if not wanted or set(wanted) - known:
        raise UsageError(f"unknown --sections {sections!r}; choose from {', '.join(sorted(known))}")
    parsed = []
    for spec in shapes.split(","):
        m = re.fullmatch(r"(lstm|gru|rnn)(\d+)x(\d+)", spec.strip())
        if not m:
            raise UsageError(f"cannot read the shape {spec!r}; write it like lstm2x256")
        parsed.append(b.Shape(m.group(1), int(m.group(2)), int(m.group(3)), seq_len, batch_size))

    def report(section: str, row: dict) -> None:
        if json_out:
            print(json.dumps({"section": section, **row}), flush=True)
        ui.bench_row(section, row)

    ui.info(f"charrnn bench on {b.machine_description()}")
    if "startup" in wanted:
        b.bench_startup(report)
    if "train" in wanted:
        if device not in ("cpu", "cuda"):
            raise UsageError(f"unknown --device {device!r} for bench; choose cpu or cuda")
        b.bench_training(report, parsed, steps, rounds, device)
    if "sample" in wanted:
        b.bench_sampling(report, sample_hidden, 2, sample_length, num)
    if "big" in wanted:
        b.bench_big_corpus(report, big_mb, workdir)
    if "quality" in wanted:
        b.bench_quality(report, quality_corpus, quality_budget, workdir)
    if "processes" in wanted:
        b.bench_processes(report, parsed[0].hidden, steps, workdir)


_OWN_PROCESS = False  # main() runs the app as the whole process
_EXIT_WITHOUT_SHUTDOWN = False  # set by `train` (see there)


def main() -> None:
    """Run the app; a usage error (bad option, bad value) is one plain line and exit code 2."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # the parser's own errors carry a message and an exit code
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            code = 0
            print(e.format_message(), file=sys.stderr)
        else:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {e.format_message()}{where}", file=sys.stderr)
            code = e.exit_code
    except (KeyboardInterrupt, EOFError):
        print("error: interrupted", file=sys.stderr)
        code = 130
    code = code if isinstance(code, int) else 0
    if _EXIT_WITHOUT_SHUTDOWN:  # everything is saved and closed; nothing is left for atexit to do
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
