"""`charrnn export`: a checkpoint's model alone (weights, config, vocabulary, sentiment unit) as a portable folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import HOME, CheckpointArg


@handle_errors
def export_cmd(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write: model.safetensors, config.json, vocab.json (and sentiment.json).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an export already in that folder (never any other files).")] = False,
):
    """Write the model alone, without optimiser or training state, as safetensors + JSON that any
    charrnn command, charrnn.load, or torch with safetensors can load."""
    from charrnn import checkpoint as ckm
    from charrnn import ui
    from charrnn.export import export

    path, ck = ckm.open_checkpoint(checkpoint, home=HOME, on_warn=ui.warn)
    res = export(ck, path, out, force)
    ui.info(f"exported {path} to {res.folder}")
    ui.info("  " + ", ".join(f"{name} {ui.fmt_size(n)}" for name, n in res.sizes.items()))
    share = f" ({res.total / res.source_bytes:.0%})" if res.source_bytes else ""
    ui.info(f"  {ui.fmt_size(res.total)} in all{share}, against {ui.fmt_size(res.source_bytes)} for the full "
            "checkpoint (optimiser and training state left out)")
