"""`charrnn checkpoints list|show|prune|upgrade`: runs and their checkpoints (the work is charrnn/runs.py's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import HOME

checkpoints_app = typer.Typer(help="List, inspect, prune and upgrade runs and their checkpoints.", no_args_is_help=True)


@checkpoints_app.command("list")
@handle_errors
def checkpoints_list(
    dir: Annotated[Path, typer.Option("--dir", help="Folder holding run folders.")] = HOME,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per run on stdout.")] = False,
):
    """The runs under ./checkpoints (or --dir): checkpoints, last step, best validation loss, disk."""
    from charrnn import ui
    from charrnn.errors import CheckpointError
    from charrnn.runs import run_rows

    if not dir.is_dir():
        raise CheckpointError(f"no run folder {dir.resolve()}; train a model first with 'charrnn train CORPUS'")
    rows = run_rows(dir, on_warn=ui.warn)
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
    """Details of a run or checkpoint: model, training settings, progress, vocabulary, files; for a run, its validation-loss curve."""
    from charrnn import runs, ui

    details = runs.checkpoint_details(path, on_warn=ui.warn)
    if json_out:
        print(json.dumps(details, default=str))
        return
    ui.checkpoint_card(details, runs.format_note(details["checkpoint"], path))
    if path.is_dir():
        ui.checkpoints_table(str(path), runs.checkpoint_files(path, on_warn=ui.warn))
        if (path / "metrics.jsonl").is_file():
            from charrnn.curves import read_curve

            ui.loss_curve(read_curve(path))


@checkpoints_app.command("prune")
@handle_errors
def checkpoints_prune(
    dir: Annotated[Path, typer.Option("--dir", help="Folder holding run folders, or one run folder.")] = HOME,
    keep: Annotated[int, typer.Option(min=1, help="Newest checkpoints kept per run, besides the best.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
):
    """Delete all but the best and the newest --keep checkpoints of every run (a run being trained is left alone)."""
    from charrnn import runs, ui
    from charrnn.errors import CheckpointError

    if not dir.is_dir():
        raise CheckpointError(f"no folder {dir.resolve()}")
    done = runs.prune(dir, keep, dry_run=dry_run,
                      on_skip=lambda busy: ui.info(f"skipped: {busy}; prune it when that ends"), on_warn=ui.warn)
    verb = "would delete" if dry_run else "deleted"
    ui.info(f"{verb} {done['checkpoints']} checkpoint(s) in {done['runs']} run(s), {ui.fmt_size(done['bytes'])}")


@checkpoints_app.command("upgrade")
@handle_errors
def checkpoints_upgrade(
    path: Annotated[Path, typer.Argument(help="A .pt checkpoint, a run folder, or a folder of run folders.")],
):
    """Rewrite old .pt checkpoints as checksummed .safetensors; each .pt goes once its new file reads back the same."""
    from charrnn import runs, ui
    from charrnn.errors import CheckpointError

    done = runs.upgrade(path, on_upgraded=lambda old, new: ui.info(f"upgraded {old} -> {new.name}"), on_warn=ui.warn)
    if not done["files"]:
        ui.info(f"no .pt checkpoints to upgrade in {path}")
    elif done["failed"]:
        raise CheckpointError(f"{len(done['failed'])} of {done['files']} checkpoint(s) could not be upgraded (see above); "
                              "the others are upgraded")
