"""`charrnn neuron find|show|score`: find the sentiment unit of a checkpoint, show a unit's value over text,
score the texts of a file.

torch is imported inside the commands, so `charrnn --help` starts fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import CheckpointArg, StateKind

neuron_app = typer.Typer(help="Find the sentiment unit of a model, show a unit's value over text, score texts.",
                         no_args_is_help=True)


@neuron_app.command("find")
@handle_errors
def find(
    checkpoint: CheckpointArg,
    labeled: Annotated[Path, typer.Argument(help="Labeled TSV (label<TAB>text) to fit on.")],
    test: Annotated[Optional[Path], typer.Option(help="Labeled TSV to score on \\[default: a 20% split of LABELED].", show_default=False)] = None,
    val: Annotated[Optional[Path], typer.Option(help="Labeled TSV to choose the regularisation on \\[default: a 20% split of LABELED].", show_default=False)] = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Search the units of every layer, not only the top one.")] = False,
    state: Annotated[Optional[StateKind], typer.Option(help="State to read \\[default: c for LSTM-like cells, h for GRU/RNN].", show_default=False)] = None,
    neuron: Annotated[Optional[int], typer.Option(min=0, help="Score this top-layer unit instead of choosing one.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the checkpoint with its unit here \\[default: rewrite CHECKPOINT in place, atomically].", show_default=False)] = None,
    no_save: Annotated[bool, typer.Option("--no-save", help="Only report; do not store the unit.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the splits.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help='Print {"unit", "polarity", "single_unit_accuracy", "all_units_accuracy", "test_examples"}.')] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table.")] = False,
):
    """Find the unit that best predicts the labels (L1 logistic regression on final states) and store it."""
    import time

    from charrnn import checkpoint as ckm
    from charrnn import ui
    from charrnn.config import check_seed
    from charrnn.neuron import find_sentiment_unit, set_record

    check_seed(seed)
    t0 = time.perf_counter()
    model, vocab, ck = ckm.load_model(checkpoint, on_warn=ui.warn)
    path = Path(ck["path"])
    res = find_sentiment_unit(model, vocab, labeled, test, val, state.value if state else None, all_layers, neuron,
                              seed, on_warn=ui.warn)
    saved = None
    if not no_save:
        rec = res.record("find", fitted_on=str(labeled), lam=res.lam,
                         tested_on=str(test) if test else "split")
        ck.pop("path", None)
        set_record(ck, rec)
        saved = Path(out) if out else path
        if ck.get("export") and out is None:  # an export folder keeps its unit in sentiment.json
            from charrnn.export import write_record

            write_record(path, rec)
        else:
            ckm.save(saved, ck)
    summary = {"unit": res.unit, "polarity": res.polarity, "single_unit_accuracy": res.single_unit_accuracy,
               "all_units_accuracy": res.all_units_accuracy, "test_examples": res.test_examples}
    if json_out:
        print(json.dumps({**summary, "layer": res.layer, "state": res.state, "fix_values": res.fix_values,
                          "val_single_unit_accuracy": res.val_single_unit_accuracy,
                          "val_all_units_accuracy": res.val_all_units_accuracy, "rank": res.rank,
                          "nonzero": res.nonzero, "saved": str(saved) if saved else None}))
    if not quiet:
        ui.neuron_find_table(res, str(path), str(labeled), str(test) if test else "a 20% split",
                             res.fit_examples, str(saved) if saved else None, time.perf_counter() - t0)


@neuron_app.command("show")
@handle_errors
def show(
    checkpoint: CheckpointArg,
    text: Annotated[Optional[str], typer.Argument(help="Text to show (or --file).", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option(help="Read the text from this file.")] = None,
    neuron: Annotated[Optional[int], typer.Option(min=0, help="Show this top-layer unit \\[default: the checkpoint's sentiment unit].", show_default=False)] = None,
    state: Annotated[Optional[StateKind], typer.Option(help="State to read \\[default: the unit's, or c for LSTM-like cells].", show_default=False)] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write the coloured text as a standalone HTML page.")] = None,
):
    """The text coloured by a unit's value after each character, red (negative) to green (positive)."""
    from charrnn import checkpoint as ckm
    from charrnn import render, ui
    from charrnn.errors import DataError, UsageError
    from charrnn.neuron import check_unit, default_state, get_record, unit_trace
    from charrnn.sample import clean_prime

    if (text is None) == (file is None):
        raise UsageError("give the TEXT to show or --file FILE (one of them)")
    if file is not None:
        from charrnn.data import iter_text

        text = "".join(iter_text(file))
    model, vocab, ck = ckm.load_model(checkpoint, on_warn=ui.warn)
    rec = None
    if neuron is None:
        rec = get_record(ck)
        shown = rec["state"].split("+")[0]  # a bound unit's 'c+h' record holds c's values
        unit, layer, which = rec["unit"], rec["layer"], state.value if state else shown
        if which != shown:
            rec = None  # its fix values are for the other state
    else:
        unit, layer, which = neuron, model.config.layers - 1, state.value if state else default_state(model)
    check_unit(model, unit, which, layer)
    kept, unknown = clean_prime(text, vocab)
    if unknown:
        ui.warn(f"characters this model never saw were skipped: {unknown[:20]!r}")
    if not kept:
        raise DataError("no text left to show once the characters this model never saw were skipped")
    values = unit_trace(model, vocab, kept, unit, layer, which)
    lo, hi = render.color_range(values, rec)
    colors = render.unit_colors(values, lo, hi)
    title = f"unit {unit} (layer {layer}, {which}) of {ck['path']}"
    ui.unit_text(kept, colors, f"{title}: red {lo:.2f} .. green {hi:.2f}; "
                 f"range over this text {min(values):.2f} .. {max(values):.2f}, last {values[-1]:.2f}")
    if html is not None:
        ckm.atomic_write_text(html, render.render_html(kept, values, colors, title))
        ui.info(f"wrote {html}")


@neuron_app.command("score")
@handle_errors
def score(
    checkpoint: CheckpointArg,
    file: Annotated[Path, typer.Argument(help="Text file (one text per line) or labeled TSV (label<TAB>text).")],
    jsonl: Annotated[bool, typer.Option("--jsonl", help='One JSON object per text on stdout, in file order: {"line", "value", "p_positive", ("label", "correct",) "text"} (the default when stdout is not a terminal).')] = False,
    show: Annotated[int, typer.Option(min=1, help="On a terminal: list this many of the most positive and of the most negative texts.")] = 20,
):
    """The sentiment unit's final value and P(positive) for each text; with a labeled TSV, accuracy too."""
    import time

    from charrnn import checkpoint as ckm
    from charrnn import ui
    from charrnn.neuron import get_record
    from charrnn.neuron.score import score_file

    model, vocab, ck = ckm.load_model(checkpoint, on_warn=ui.warn)
    rec = get_record(ck)
    if not isinstance(rec.get("logistic"), dict):
        ui.warn(f"{ck['path']}'s sentiment unit has no stored logistic fit (it predates them), so there is no "
                "P(positive): values only; run 'charrnn neuron find CHECKPOINT LABELED.tsv' again to store one")
    t0 = time.perf_counter()
    res = score_file(model, vocab, rec, file, on_warn=ui.warn)
    seconds = time.perf_counter() - t0
    if jsonl or not sys.stdout.isatty():
        for row in res.rows():
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        acc = res.accuracy
        ui.info(f"{len(res.texts)} texts of {file}" + ("" if acc is None else f"; accuracy {acc:.1%}"))
    else:
        ui.neuron_score_table(res, rec, str(ck["path"]), str(file), show, seconds)
