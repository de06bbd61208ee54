"""What a checkpoint payload must hold, and the model built from it."""

from __future__ import annotations

from pathlib import Path

import torch

from charrnn.errors import CheckpointError

MODEL_KEYS = ("vocab_size", "cell", "layers", "hidden", "embed", "dropout")  # model_config entries read on load


def check_payload(ck: dict, path: Path, train: bool = False) -> None:
    """A one-line CheckpointError when a loaded payload lacks what building its model (and, with
    `train`, showing or resuming its run) needs, or has model settings this charrnn does not know."""
    import dataclasses

    from charrnn.model import ModelConfig

    def need(d: dict, key: str, kind, where: str = ""):
        if key not in d:
            raise CheckpointError(f"{path} lacks '{where}{key}'; it was not written by charrnn, or was edited")
        if not isinstance(d[key], kind) or isinstance(d[key], bool) and kind is not bool:
            raise CheckpointError(f"{path} has a malformed '{where}{key}'; it was not written by charrnn, or was edited")
        return d[key]

    mc = need(ck, "model_config", dict)
    unknown = sorted(set(mc) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        versions = ck.get("versions") if isinstance(ck.get("versions"), dict) else {}
        raise CheckpointError(
            f"{path} has model settings this charrnn does not know ({', '.join(map(str, unknown))}); "
            f"use the charrnn version that wrote it ({versions.get('charrnn', '?')})")
    for key in MODEL_KEYS:
        need(mc, key, str if key == "cell" else (float, int) if key == "dropout" else int, "model_config.")
    vocab = need(ck, "vocab", str)
    if len(vocab) != mc["vocab_size"]:
        raise CheckpointError(
            f"{path} has a vocabulary of {len(vocab)} characters for a model of {mc['vocab_size']}; "
            "it was not written by charrnn, or was edited")
    weights = need(ck, "model", dict)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} has a malformed 'model' (not all tensors); it was not written by charrnn, or was edited")
    if train:
        if ck.get("export") and "train" not in ck:
            raise CheckpointError(f"{path} is an export: the model alone, without the training state this needs; "
                                  "use the run it was exported from (its config.json names it)")
        tr = need(ck, "train", dict)
        need(tr, "step", int, "train.")
        need(tr, "config", dict, "train.")
        need(tr, "state", dict, "train.")
        need(tr, "corpus", list, "train.")


def build_model(ck: dict, path: Path):
    """The model a checkpoint describes, with its weights; CheckpointError (one line) when they do not fit."""
    from charrnn.model import CharRNN, ModelConfig

    check_payload(ck, path)
    try:
        model = CharRNN(ModelConfig(**ck["model_config"]))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not match this charrnn's model code ({str(e).splitlines()[0][:100]})") from None
    load_weights(model, ck, path)
    return model


def load_weights(model, ck: dict, path: Path) -> None:
    try:
        model.load_state_dict(ck["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this charrnn's model code ({str(e).splitlines()[0][:100]})") from None

