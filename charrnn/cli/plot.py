"""`charrnn plot RUN... -o FILE`: validation loss of one or several runs as a picture (the work is charrnn/plot.py's)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.errors import handle_errors


class XAxis(str, Enum):
    steps = "steps"
    time = "time"


@handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with its metrics.jsonl).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The picture: a .png, .svg or .html (self-contained page) file.", show_default=False)],
    x: Annotated[XAxis, typer.Option("--x", help="Horizontal axis: optimiser steps, or wall-clock time of the run.")] = XAxis.steps,
):
    """Draw the validation loss of one or several runs, labelled by run, to compare cells, widths or learning rates."""
    from charrnn import ui
    from charrnn.curves import read_curve
    from charrnn.errors import CheckpointError
    from charrnn.plot import check_output, write_plot

    check_output(output)  # a wrong suffix is said before any run is read
    curves = [read_curve(r) for r in runs]
    if not any(c.losses for c in curves):
        raise CheckpointError("none of the runs has a validation loss yet; plot them after their first evaluation")
    for c in curves:
        if not c.losses:
            ui.warn(f"{c.run} has no validation loss in its metrics.jsonl yet; left out")
    curves = [c for c in curves if c.losses]
    size = write_plot(curves, output, x.value)
    ui.info(f"wrote {output} ({ui.fmt_size(size)}): validation loss of {len(curves)} run(s) by {x.value}")
