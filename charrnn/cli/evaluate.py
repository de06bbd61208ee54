"""`charrnn eval` and `charrnn gradients`: a checkpoint measured on a text file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import HOME, CheckpointArg, Device, Precision, RunDevice


@handle_errors
def eval_cmd(
    checkpoint: CheckpointArg,
    file: Annotated[Path, typer.Argument(help="Text file to score.")],
    json_out: Annotated[bool, typer.Option("--json", help='Print {"loss", "bpc", "chars"} as JSON.')] = False,
    device: RunDevice = Device.cpu,
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


@handle_errors
def gradients(
    checkpoint: CheckpointArg,
    file: Annotated[Path, typer.Argument(help="Text file to take the stretches of text from.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Steps back: K in k = 1..K.")] = 50,
    windows: Annotated[int, typer.Option(min=1, help="Stretches of text averaged over.")] = 16,
    json_out: Annotated[bool, typer.Option("--json", help='Print {"k": [...], "norms": [[...] per layer], ...} as JSON.')] = False,
    device: RunDevice = Device.cpu,
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
