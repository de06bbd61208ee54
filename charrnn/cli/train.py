"""`charrnn train`: a new run on a corpus, or one continued with --resume."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import HOME, Cell, Device, Precision, Quiet
from charrnn.config import SentimentConfig, TrainConfig


@handle_errors
def train(
    corpus: Annotated[Optional[list[Path]], typer.Argument(help="Text files (or labeled label<TAB>text TSV), read in order.", show_default=False)] = None,
    cell: Annotated[Cell, typer.Option(help="Recurrent cell.")] = Cell.lstm,
    layers: Annotated[Optional[int], typer.Option(min=1, help="Stacked layers \\[default: 2].", show_default=False)] = None,
    hidden: Annotated[Optional[int], typer.Option(min=1, help="Units per layer \\[default: chosen from the time budget, this machine's measured speed and the corpus].", show_default=False)] = None,
    embed: Annotated[int, typer.Option(min=0, help="Embedding width; 0 = same as --hidden.")] = 0,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Dropout \\[default: from the expected passes over the corpus: 0 to 0.3].", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Characters per backprop-through-time window \\[default: 64 on a CPU, 128 on a GPU].", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Parallel streams \\[default: 32 on a CPU, 128 on CUDA].", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate \\[default: 5e-3 at 256 units, times sqrt(256/hidden)].", show_default=False)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(min=0.0, help="Global gradient-norm clip, 0 = off \\[default: 1.0].", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW's decoupled weight decay (each step shrinks the weights by lr times it), 0 = off \\[default: 0.3; 0 with --sentiment-unit].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed \\[default: 1337].", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Train for this many steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Train for this many passes over the corpus.")] = None,
    time: Annotated[Optional[str], typer.Option("--time", help="Wall-clock budget (90s, 5m, 1h): train, evaluate, save, exit 0.")] = None,
    val_frac: Annotated[Optional[float], typer.Option(help="Last fraction held out for validation \\[default: 0.1].", show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="Steps between evaluations and saves \\[default: about 10 per run].", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option(min=1, help="Newest checkpoints kept besides the best \\[default: 1].", show_default=False)] = None,
    eval_sample_len: Annotated[Optional[int], typer.Option(min=0, help=f"Characters of the seeded sample drawn at each evaluation (shown, and kept in the run's samples.jsonl); 0 = none \\[default: {TrainConfig.eval_sample_len}].", show_default=False)] = None,
    patience: Annotated[Optional[int], typer.Option(min=0, help="Stop after this many evaluations without a better validation loss; 0 = never \\[default: 5 for a time budget, 0 with --steps/--epochs].", show_default=False)] = None,
    run: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help="Run folder (--run-dir is the same; use it under torchrun, whose parser takes --run for its own --run-path) \\[default: a new folder under ./checkpoints].", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder exactly where it stopped.")] = None,
    allow_changed_corpus: Annotated[bool, typer.Option("--allow-changed-corpus", help="With --resume: go on although a corpus file's content changed since the run started.")] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Start a new run from this checkpoint's weights.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads \\[default: PyTorch's].", show_default=False)] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=f"The forward pass in fp32, or in bf16 autocast (weights, gradients and loss stay fp32); auto = bf16 where measured faster at the start on a CPU with native bf16, CUDA's mixed precision on a GPU, else fp32. With --resume: switch the run's own (kept otherwise) \\[default: {TrainConfig.precision}].", show_default=False)] = None,
    encoding_errors: Annotated[Optional[str], typer.Option(help="'replace' to train on a file with invalid UTF-8 \\[default: strict].", show_default=False)] = None,
    sentiment_unit: Annotated[bool, typer.Option("--sentiment-unit", help="Bind unit 0 of the top layer to the labels of a labeled TSV corpus, for sample --sentiment.")] = False,
    sentiment_contrast: Annotated[Optional[float], typer.Option(min=0.0, help=f"With --sentiment-unit: weight of the loss asking fixed reviews to be likelier under their own label than the opposite one; off for the first {SentimentConfig.contrast_from:.0%} of the run's steps, at full weight from {2 * SentimentConfig.contrast_from:.0%} \\[default: {SentimentConfig.contrast}].", show_default=False)] = None,
    sentiment_fixed: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help=f"With --sentiment-unit: share of reviews whose unit is fixed to their label \\[default: {SentimentConfig.fixed}].", show_default=False)] = None,
    sentiment_forced: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, hidden=True, help="The old name of --sentiment-fixed.")] = None,
    sentiment_read: Annotated[Optional[int], typer.Option(min=0, help=f"With --sentiment-unit: a reading pass of N labeled texts per step, the loss after each one's last character, instead of a loss at every character of free reviews \\[default: {SentimentConfig.read}].", show_default=False)] = None,
    tensorboard: Annotated[Optional[Path], typer.Option(help="Also log train/val loss, learning rate and chars/s for TensorBoard, in DIR/RUN_NAME.", show_default=False)] = None,
    quiet: Quiet = False,
):
    """Train a model on CORPUS (or continue one with --resume RUN_DIR)."""
    from charrnn import ui
    from charrnn.config import parse_duration
    from charrnn.errors import UsageError
    from charrnn.train import Trainer

    display = callback = ui.TrainDisplay(quiet=quiet)
    if tensorboard is not None:
        from charrnn.events import Receivers
        from charrnn.tensorboard import TensorBoardEvents

        callback = Receivers(display, TensorBoardEvents(tensorboard))
    if resume is not None:
        if corpus:
            raise UsageError("--resume continues a run on its own corpus; leave out the CORPUS argument")
        trainer = Trainer.resume(resume, callback=callback, threads=threads,
                                 device=device.value if device != Device.auto else None,
                                 allow_changed_corpus=allow_changed_corpus,
                                 precision=precision.value if precision is not None else None)
    else:
        if allow_changed_corpus:
            raise UsageError("--allow-changed-corpus goes with --resume RUN_DIR")
        if not corpus:
            raise UsageError("name a corpus file to train on (or --resume RUN_DIR)")
        from charrnn.corpora import expand_corpus_args

        corpus = expand_corpus_args(corpus)  # patterns a shell passed unexpanded
        given = dict(
            layers=layers, hidden=hidden, dropout=dropout, seq_len=seq_len, batch_size=batch_size, lr=lr,
            grad_clip=grad_clip, weight_decay=weight_decay, seed=seed, steps=steps, epochs=epochs, val_frac=val_frac,
            eval_every=eval_every, keep=keep, patience=patience, threads=threads, encoding_errors=encoding_errors,
            eval_sample_len=eval_sample_len, precision=precision.value if precision is not None else None,
        )
        cfg = TrainConfig(cell=cell.value, embed=embed, device=device.value,
                          sentiment=_sentiment_config(sentiment_unit, sentiment_contrast, sentiment_fixed,
                                                      sentiment_forced, sentiment_read),
                          **{k: v for k, v in given.items() if v is not None})
        if time is not None:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "time_s": parse_duration(time)})  # the config is frozen
        trainer = Trainer.new(corpus, cfg, run_dir=run, init_from=init_from, home=HOME, callback=callback)
    # The Trainer takes SIGINT/SIGTERM while it runs and hands them back when its last save is on
    # disk. One that comes after that (the run is complete) must not kill the process on its way
    # out: it is ignored from here on, and cli.main() ends the process without Python's shutdown, during
    # which the default handlers are back (measured: a SIGINT 0.1 s after the last save ended the
    # process with -2 and nothing printed).
    import signal

    from charrnn import cli

    if cli._OWN_PROCESS:  # not when the app runs inside another program (tests, notebooks)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        cli._EXIT_WITHOUT_SHUTDOWN = True
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
