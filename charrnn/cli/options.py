"""What several commands share: the choices (str Enums the parser checks) and the option types.

One place for each, so `sample --state` and `neuron find --state` cannot drift apart.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

HOME = Path("checkpoints")  # where runs live; charrnn.checkpoint.DEFAULT_HOME (not imported: it imports torch)


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


class Words(str, Enum):
    """What sampling may spell (`sample --words`, charrnn/lexicon.py)."""

    known = "known"
    any = "any"


class StateKind(str, Enum):
    """A state part a unit is read or fixed on (`sample --state`, `neuron find|show --state`)."""

    c = "c"
    h = "h"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint or run folder.")]
RunDevice = Annotated[Device, typer.Option(help="Where to run.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
