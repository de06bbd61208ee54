"""Exported models: a checkpoint's model alone, as a folder any charrnn command (or torch alone) loads.

An export folder holds
- `model.safetensors`: the weights under the model's own parameter names (`embedding.weight`,
  `rnn.weight_ih_l0`, ..., `head.bias`), a plain safetensors file (written by charrnn.ckptfile, with
  a sha256 in its metadata that charrnn checks and other readers ignore);
- `config.json`: the model settings (charrnn.model.ModelConfig's fields, flat) and where it came from;
- `vocab.json`: the characters, a JSON list, id = position;
- `sentiment.json`: the sentiment unit record, when the checkpoint has one (charrnn.neuron.steer);
- `words.txt`: the words of the corpus that `sample --words known` spells (charrnn.lexicon), most
  frequent first, one per line after a first line `min_count N`, when the checkpoint has them.
No optimiser state, no training state, no pickle. `load_export` builds from it the same in-memory
payload a checkpoint file gives, so charrnn.checkpoint.open_checkpoint serves both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from charrnn import __version__
from charrnn.atomicfile import _fsync_dir, atomic_write_text
from charrnn.ckptfile import FORMAT, FORMAT_VERSION, container_parts, read_tensors
from charrnn.ckptmodel import check_payload
from charrnn.errors import CheckpointError
from charrnn.lexicon import Lexicon

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
RECORD_FILE = "sentiment.json"
WORDS_FILE = "words.txt"
FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, RECORD_FILE, WORDS_FILE)
EXPORT_FORMAT = "charrnn-export"
EXPORT_VERSION = 1  # the folder's layout; a reader refuses a newer one with a message
META_KEYS = ("format", "format_version", "charrnn_version", "torch_version", "parameters", "source")  # not model settings


def is_export(path: Path) -> bool:
    """Whether `path` is an export folder (it holds model.safetensors and config.json)."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


@dataclass
class Exported:
    """What `export` wrote: the folder, each file's size, and the size of the checkpoint it came from."""

    folder: Path
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    source: Path | None = None
    source_bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


# ---------------------------------------------------------------- writing


def _config(ck: dict, source: Path) -> dict:
    train = ck.get("train") if isinstance(ck.get("train"), dict) else {}
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, **ck["model_config"],
        "parameters": sum(t.numel() for t in ck["model"].values()),
        "charrnn_version": __version__, "torch_version": str(torch.__version__),
        "source": {"checkpoint": str(source), "step": train.get("step"), "val_loss": ck.get("val_loss")},
    }


def check_target(out: Path, force: bool) -> None:
    """A new or empty folder is fine; an export folder only with `force`; anything else never (it may be a run)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file; export into a new or empty folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if not force:
        raise CheckpointError(f"{out} already exists and is not empty; add --force to replace an export there, "
                              "or choose a new folder")
    others = sorted(names - set(FILES))
    if others or not is_export(out):
        shown = ", ".join(others[:3]) or ", ".join(sorted(names)[:3])
        raise CheckpointError(f"{out} holds files that are not an export's ({shown}); --force replaces only an "
                              "export folder, so choose a new folder")


def export(ck: dict, source: Path, out: Path, force: bool = False) -> Exported:
    """Write the model of checkpoint payload `ck` (read from `source`) as an export folder `out`, atomically:
    every file is written into a temporary folder beside `out`, which is then renamed into place."""
    out, source = Path(out), Path(source)
    check_payload(ck, source)
    check_target(out, force)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ck["model"].items()}
    texts = {CONFIG_FILE: json.dumps(_config(ck, source), indent=2) + "\n",
             VOCAB_FILE: json.dumps(list(ck["vocab"]), ensure_ascii=False) + "\n"}
    if ck.get("sentiment"):
        from charrnn.neuron.steer import upgrade_record

        texts[RECORD_FILE] = json.dumps(upgrade_record(ck["sentiment"]), indent=1) + "\n"
    lexicon = Lexicon.from_record(ck.get("lexicon"))
    if lexicon is not None:
        texts[WORDS_FILE] = f"min_count {lexicon.min_count}\n" + "".join(w + "\n" for w in lexicon.words)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private (0700); an export is shared like any folder
    except OSError as e:
        raise CheckpointError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        sizes = {MODEL_FILE: _write_parts(tmp / MODEL_FILE, container_parts(tensors, {"format": "pt"}))}
        for name, text in texts.items():
            sizes[name] = _write_parts(tmp / name, [text.encode()])
        _fsync_dir(tmp)
        _place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the export {out}: {e.strerror or e}; nothing was changed there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return Exported(out, sizes, source, size)


def _write_parts(path: Path, parts: list) -> int:
    with open(path, "wb") as f:
        for p in parts:
            f.write(p)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`. An empty `out` is replaced by the rename itself; an export
    there (--force) is moved aside first and deleted only once the new one is in place."""
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)  # put the previous export back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)  # POSIX rename replaces an empty folder
    _fsync_dir(out.parent)


def write_record(folder: Path, rec: dict) -> Path:
    """Store a sentiment unit record in an export folder (`neuron find` on an export), atomically."""
    path = Path(folder) / RECORD_FILE
    try:
        atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None
    return path


# ---------------------------------------------------------------- reading


def _json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:80]}); {what}") from None


def load_export(folder: Path, device: str | torch.device = "cpu") -> dict:
    """The payload of an export folder, shaped as a checkpoint's (model_config, vocab, model, sentiment,
    val_loss), without a 'train' entry; one-line CheckpointError for anything missing or malformed."""
    folder = Path(folder)
    again = "export the model again with 'charrnn export RUN -o DIR'"
    cfg = _json(folder / CONFIG_FILE, again)
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a charrnn export's config (no \"format\": \"{EXPORT_FORMAT}\")")
    if cfg.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(f"{folder} is export format {cfg.get('format_version')}, this charrnn reads format "
                              f"{EXPORT_VERSION}; use the charrnn version that wrote it ({cfg.get('charrnn_version', '?')})")
    if not (folder / VOCAB_FILE).is_file():
        raise CheckpointError(f"{folder} lacks {VOCAB_FILE}; {again}")
    chars = _json(folder / VOCAB_FILE, again)
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise CheckpointError(f"{folder / VOCAB_FILE} must be a JSON list of distinct single characters; {again}")
    tensors, _ = read_tensors(folder / MODEL_FILE, again)
    source = cfg.get("source") if isinstance(cfg.get("source"), dict) else {}
    ck = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "export": True,
        "model_config": {k: v for k, v in cfg.items() if k not in META_KEYS},
        "vocab": "".join(chars), "model": {k: v.to(device) for k, v in tensors.items()},
        "val_loss": source.get("val_loss"), "versions": {"charrnn": cfg.get("charrnn_version"), "torch": cfg.get("torch_version")},
        "saved_at": (folder / MODEL_FILE).stat().st_mtime,
    }
    if (folder / RECORD_FILE).is_file():
        rec = _json(folder / RECORD_FILE, again)
        if not isinstance(rec, dict):
            raise CheckpointError(f"{folder / RECORD_FILE} is not a sentiment unit record (a JSON object); {again}")
        ck["sentiment"] = rec
    if (folder / WORDS_FILE).is_file():
        ck["lexicon"] = _words(folder / WORDS_FILE, again)
    check_payload(ck, folder)
    return ck


def _words(path: Path, again: str) -> dict:
    """The lexicon record (charrnn.lexicon) of an export's words.txt."""
    try:
        head, *words = path.read_text(encoding="utf-8").split("\n")
        key, count = head.split(" ")
        if key != "min_count" or any(" " in w for w in words):
            raise ValueError
        return Lexicon(tuple(w for w in words if w), int(count)).to_record()
    except (OSError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path} is not an export's word list ('min_count N', then one word per line); {again}") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
