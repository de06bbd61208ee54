"""The checkpoint file format: a payload as a checksummed safetensors file, and back; old `.pt` zips read.

A payload (the nested dict the trainer builds) is split in two: every tensor (weights, optimiser
moments, RNG states, carried state) goes in the tensor table under a path-like key, and the rest
(config, vocabulary, run state) is a JSON skeleton in the header's metadata, beside a sha256 of the
whole content that every decode checks. So reading never runs the unpickler, and a damaged file is
caught instead of silently used. Older `.pt` files (a torch.save zip) still decode, through
torch.load(weights_only=True) after a check of the zip's CRCs.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import math
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from charrnn.errors import CheckpointDamaged, CheckpointError

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1  # the payload's layout (its keys and their meaning), the same in both file formats
SUFFIX = ".safetensors"
ZIP_MAGIC = b"PK\x03\x04"


# ---------------------------------------------------------------- payload <-> tensors + JSON
#
# The skeleton is plain JSON; what JSON cannot say is tagged with a one-key object: {"$tensor": key},
# {"$tuple": [...]}, {"$float": "nan"}, and {"$dict": [[key, value], ...]} for a dict whose keys are
# not all strings (Adam's `state` is keyed by parameter index) or that has a key starting with "$".

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def pack(payload) -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON skeleton, tensors by key) for any nesting of dicts, lists, tuples, tensors and plain values."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path: str):
        if isinstance(x, torch.Tensor):
            key = path.lstrip("/") or "tensor"
            while key in tensors:  # two paths can only meet through odd dict keys ("a/b" and a -> b)
                key += "'"
            tensors[key] = x.detach().to("cpu").contiguous()  # no copy when it is already so
            return {"$tensor": key}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"$float": repr(x)}
        if isinstance(x, tuple):
            return {"$tuple": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            return {"$dict": [[walk(k, f"{path}/{k}#key"), walk(v, f"{path}/{k}")] for k, v in x.items()]}
        raise TypeError(f"a checkpoint cannot hold a {type(x).__name__} (at {path or 'the top'})")

    return walk(payload, ""), tensors


def unpack(skeleton, tensors: dict[str, torch.Tensor] | None, device: str | torch.device = "cpu"):
    """The payload back from `pack`'s output; with tensors=None, tensors come back as None (a quick look)."""

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (tag, v), = x.items()
            if tag == "$tensor":
                return None if tensors is None else tensors[v].to(device)
            if tag == "$tuple":
                return tuple(walk(i) for i in v)
            if tag == "$float":
                return float(v)
            if tag == "$dict":
                return {walk(k): walk(val) for k, val in v}
        return {k: walk(v) for k, v in x.items()}

    return walk(skeleton)


# ---------------------------------------------------------------- the safetensors container
#
# The container is written and read here, following the safetensors specification (8-byte little-endian
# header length, JSON header with each tensor's dtype, shape and data offsets, then the data). The
# reference package's own writer needs numpy, which charrnn does not; tests read these files back
# with the reference reader. Reading parses JSON and copies bytes into tensors: nothing in a file runs.


def _tensor_buffer(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor, without a copy; valid while `t` lives."""
    n = t.numel() * t.element_size()
    return (ctypes.c_ubyte * n).from_address(t.data_ptr()) if n else b""


def _digest(header: dict, chunks) -> str:
    """sha256 of a file's whole content: its tensor table and metadata (less this digest), then its data."""
    table = dict(header)
    meta = dict(table.pop("__metadata__", None) or {})
    meta.pop("sha256", None)
    h = hashlib.sha256(json.dumps({**table, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _encode_parts(payload: dict) -> tuple[list, dict]:
    """(the file's pieces in order: header, then each tensor's bytes; the tensors those pieces point into)."""
    skeleton, tensors = pack(payload)
    meta = {"format": FORMAT, "payload": json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}
    return container_parts(tensors, meta), tensors


def container_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> list:
    """A safetensors file's pieces in order (header, then each tensor's bytes) for contiguous CPU tensors
    (kept alive by the caller until written); `meta` (string values) gains the sha256 readers check."""
    if sys.byteorder != "little":
        raise CheckpointError("charrnn writes checkpoints on little-endian machines only (safetensors stores little-endian)")
    # Larger elements first, so that every tensor starts at a multiple of its element size.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    table, chunks, offset = {}, [], 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _DTYPES:
            raise TypeError(f"a checkpoint cannot hold a {t.dtype} tensor ({key})")
        n = t.numel() * t.element_size()
        table[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        chunks.append(_tensor_buffer(t))
        offset += n
    header = {**table, "__metadata__": meta}
    meta["sha256"] = _digest(header, chunks)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return [len(text).to_bytes(8, "little") + text, *chunks]


def encode(payload: dict) -> bytes:
    """A payload as safetensors bytes (see the module docstring), with the checksum `load` verifies."""
    parts, _tensors = _encode_parts(payload)
    return b"".join(bytes(p) for p in parts)


def _split(raw) -> tuple[dict, memoryview, int]:
    """(header, data section, where the data starts) of safetensors bytes; ValueError when they are not that."""
    if len(raw) < 8:
        raise ValueError(f"only {len(raw)} bytes")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError("cut short: the header runs past the end of the file")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, memoryview(raw)[8 + n :], 8 + n


_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def _tensors(header: dict, raw: bytearray, start: int) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read into `raw` (its data section at `start`), as views of it.

    Views, not copies: loading costs one read of the file. The writer aligns every tensor; a file that
    does not gets a copy of each misaligned tensor.
    """
    out = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        dtype = _BY_NAME[spec["dtype"]]
        begin, end = spec["data_offsets"]
        shape = [int(d) for d in spec["shape"]]
        esize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(raw) - start or end - begin != math.prod(shape) * esize:
            raise ValueError(f"the table's entry for {key} does not fit the data")
        if begin == end:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(raw, dtype=dtype, count=(end - begin) // esize, offset=start + begin).view(shape)
        out[key] = t.clone() if t.data_ptr() % esize else t
    return out


def read_tensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by key, metadata) of any safetensors file; its sha256, when the metadata has one, checked.

    Damage is a CheckpointDamaged whose message ends with `fix`, what to do about it."""
    raw = _read(path)
    try:
        header, data, start = _split(raw)
        meta = header.get("__metadata__")
        meta = meta if isinstance(meta, dict) else {}
        if "sha256" in meta and _digest(header, [data]) != meta["sha256"]:
            raise ValueError("its content does not match the checksum saved with it")
        return _tensors(header, raw, start), meta
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointDamaged(f"{path} is truncated or damaged ({why}); {fix}", why) from None


def _damaged(path: Path, why: str) -> CheckpointDamaged:
    return CheckpointDamaged(
        f"{path} is truncated or damaged ({why}); use another checkpoint of its run, or the run folder, "
        "which skips damaged checkpoints", why)


def _decode_safetensors(path: Path, raw, device, with_tensors: bool) -> dict:
    try:
        header, data, start = _split(raw)
    except ValueError as e:
        raise _damaged(path, str(e)) from None
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    if "sha256" not in meta:
        if meta.get("format") == FORMAT:
            raise _damaged(path, "its checksum is missing")
        raise CheckpointError(f"{path} is not a charrnn checkpoint (a safetensors file without charrnn's format marker)")
    if _digest(header, [data]) != meta["sha256"]:
        raise _damaged(path, "its content does not match the checksum saved with it")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (a safetensors file without charrnn's format marker)")
    try:
        skeleton = json.loads(meta["payload"])
        if not with_tensors:
            return unpack(skeleton, None)
        return unpack(skeleton, _tensors(header, raw, start), device)
    except Exception as e:  # the checksum matched, so the writer itself was not charrnn's
        raise CheckpointError(f"{path} is not a readable charrnn checkpoint ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _decode_legacy(path: Path, raw: bytes, device) -> dict:
    """A torch.save zip: its CRCs checked (torch.load skips them), then unpickled with weights_only=True."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            bad = z.testzip()
    except Exception as e:  # cut short, or not a zip after all
        raise _damaged(path, f"not a readable zip archive: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}") from None
    if bad is not None:
        raise _damaged(path, f"the CRC of {bad} inside it does not match")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain data, "
                "which could run code; only load checkpoints written by charrnn"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None
    except Exception as e:  # zip and pickle errors of every kind
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _damaged(path, msg[:120]) from None


def _read(path: Path) -> bytearray:
    try:
        with open(path, "rb") as f:
            raw = bytearray(os.fstat(f.fileno()).st_size)
            got = f.readinto(raw)
        return raw if got == len(raw) else raw[:got]
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _decode(path: Path, raw: bytes, device="cpu", with_tensors: bool = True) -> dict:
    """The payload of a checkpoint file's bytes, in either format, with its format marker checked."""
    if raw[:4] == ZIP_MAGIC:
        ck = _decode_legacy(path, raw, device)
    elif path.suffix == SUFFIX or raw[8:9] == b"{":
        ck = _decode_safetensors(path, raw, device, with_tensors)
    else:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (not a safetensors file, not a PyTorch zip archive)")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charrnn checkpoint (it has no charrnn format marker)")
    if ck.get("format_version") != FORMAT_VERSION:
        versions = ck.get("versions") if isinstance(ck.get("versions"), dict) else {}
        raise CheckpointError(
            f"{path} uses checkpoint format {ck.get('format_version')}, this charrnn reads format "
            f"{FORMAT_VERSION}; use the charrnn version that wrote it ({versions.get('charrnn', '?')})"
        )
    return ck
