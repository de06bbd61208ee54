"""`charrnn bench`: charrnn against raw PyTorch loops (the measurements are charrnn/bench.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from charrnn.cli.errors import handle_errors


@handle_errors
def bench(
    sections: Annotated[str, typer.Option(help="Comma-separated: train, sample, startup, cells, big, quality, processes.")] = "train,sample,startup",
    steps: Annotated[int, typer.Option(min=2, help="Timed training steps per measurement.")] = 40,
    rounds: Annotated[int, typer.Option(min=1, help="Alternations per training shape (raw/charrnn) and in the cells section (lstm/mlstm); medians reported.")] = 2,
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
    cells_hidden: Annotated[int, typer.Option(min=1, help="Width of the one-layer LSTM and mLSTM in the 'cells' section.")] = 512,
    device: Annotated[str, typer.Option(help="Device for the 'train' section: cpu or cuda.")] = "cpu",
    train_precision: Annotated[str, typer.Option(help="The 'train' section's precisions, comma-separated from fp32, bf16, auto (as train --precision), each against a raw loop in the same precision; with fp32 and bf16, also bf16's speed-up \\[default: fp32 and, on a CPU with native bf16, bf16; on cuda, auto].", show_default=False)] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per measured row on stdout.")] = False,
):
    """Measure charrnn against raw PyTorch loops at the same shapes, side by side, and print ratios."""
    import re

    from charrnn import bench as b
    from charrnn import ui
    from charrnn.errors import UsageError

    wanted = [s.strip() for s in sections.split(",") if s.strip()]
    known = {"train", "sample", "startup", "cells", "big", "quality", "processes"}
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
        precisions = [p.strip() for p in train_precision.split(",") if p.strip()]
        if set(precisions) - {"fp32", "bf16", "auto"}:
            raise UsageError(f"unknown --train-precision {train_precision!r}; choose from fp32, bf16, auto")
        b.bench_training(report, parsed, steps, rounds, device, precisions or None)
    if "cells" in wanted:
        b.bench_cells(report, cells_hidden, steps, rounds, seq_len, batch_size)
    if "sample" in wanted:
        b.bench_sampling(report, sample_hidden, 2, sample_length, num)
    if "big" in wanted:
        b.bench_big_corpus(report, big_mb, workdir)
    if "quality" in wanted:
        b.bench_quality(report, quality_corpus, quality_budget, workdir)
    if "processes" in wanted:
        b.bench_processes(report, parsed[0].hidden, steps, workdir)
