"""The models a server serves: each run loaded once, named by its folder, looked up by that name only.

A request names a model; the name is looked up in this table and nothing else, so no request can
make the server open a file it was not started with (a path or `../` is simply not a name here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charrnn.errors import CheckpointError, UsageError


class UnknownModel(UsageError):
    """A request named a model the server does not serve (HTTP 404)."""


def model_name(path: Path) -> str:
    """A run or export folder's name; a checkpoint file's stem."""
    path = Path(path).resolve()
    return path.stem if path.is_file() else path.name


def find_runs(paths: list[Path], home: Path) -> list[Path]:
    """The runs to serve: the given paths, or every run with a checkpoint under `home`."""
    from charrnn import checkpoint as ckm

    if paths:
        return [Path(p) for p in paths]
    runs = [r for r in ckm.list_runs(home) if ckm.list_checkpoints(r)]
    if not runs:
        raise CheckpointError(f"no runs with checkpoints under {Path(home).resolve()}; train one with "
                              "'charrnn train CORPUS' or name run folders: charrnn serve RUN [RUN...]")
    return runs


def load_models(paths: list[Path], device: str = "cpu", on_warn=None) -> dict[str, Any]:
    """name -> charrnn.Model, each loaded once; two runs with one name are a usage error."""
    from charrnn.api import load

    models: dict[str, Any] = {}
    for p in paths:
        name = model_name(p)
        if name in models:
            raise UsageError(f"two runs are named {name!r} ({models[name].path} and {p}); serve one of them, "
                             "or copy one to a folder of another name")
        models[name] = load(p, device, on_warn=on_warn)
    return models


def describe(name: str, model) -> dict[str, Any]:
    """What GET /api/models says of one model."""
    c, ck = model.config, model.checkpoint
    state = ck.get("train", {}).get("state", {}) if isinstance(ck.get("train"), dict) else {}
    val = ck.get("val_loss")
    return {
        "name": name, "cell": c["cell"], "layers": c["layers"], "hidden": c["hidden"],
        "size": f"{c['layers']}x{c['hidden']}", "params": model.module.num_params(),
        "val_loss": val if val is not None else state.get("best_val_loss"), "vocab_size": len(model.vocab),
        "sentiment_unit": model.sentiment is not None,
    }


def lookup(models: dict[str, Any], name: str | None) -> tuple[str, Any]:
    """(name, model) for a request's `model` field; None picks the only model (or the first served)."""
    if name is None or name == "":
        first = next(iter(models))
        return first, models[first]
    if name in models:
        return name, models[name]
    served = ", ".join(models)
    if any(ch in name for ch in "/\\") or name.startswith("."):
        raise UsageError(f"model must be the name of a served model, not a path (got {name!r}); the served models are: {served}")
    raise UnknownModel(f"no served model is named {name!r}; the served models are: {served} (GET /api/models)")
