"""charrnn: train character-level recurrent language models, sample from them, and steer them.

The Python API (docs/api.md):

    import charrnn
    m = charrnn.load("checkpoints/RUN")            # a run folder or a checkpoint file -> Model
    m.generate("ROMEO:", num=2, length=200)         # also m.stream, m.loss, m.trace
    run = charrnn.train(["corpus.txt"], time="5m")  # -> Run; run.load() gives its best Model
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "train", "Model", "Run", "__version__"]

if TYPE_CHECKING:
    from charrnn.api import Model, Run, load, train


_API = ("load", "train", "Model", "Run")


def __getattr__(name: str):
    # charrnn.api imports torch, which the CLI's --help and completion must not wait for: it loads on first use
    if name in _API:
        from charrnn import api

        return getattr(api, name)
    raise AttributeError(f"module 'charrnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _Package(types.ModuleType):
    """charrnn itself, keeping `charrnn.train` the API's function once the training module charrnn/train.py
    is imported too: Python's import sets each submodule as an attribute of its package, which would
    replace the function with the module. The module stays importable as `from charrnn.train import ...`."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
