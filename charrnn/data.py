"""Corpus reading, the character vocabulary, the encoded-corpus cache and the stream batcher."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from charrnn.errors import DataError

CACHE_VERSION = 1
CHUNK_BYTES = 16 << 20  # read and encode big files in pieces so memory stays flat
TSV_HEADER = "label\ttext"
LABELS = {"1": 1, "0": 0, "pos": 1, "neg": 0}


def cache_dir() -> Path:
    """Where encoded corpora are cached: $CHARRNN_CACHE, else $XDG_CACHE_HOME/charrnn, else ~/.cache/charrnn."""
    if os.environ.get("CHARRNN_CACHE"):
        return Path(os.environ["CHARRNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "charrnn"


# ---------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocab:
    """A code-point vocabulary: `chars[i]` is the character with id i, in code-point order."""

    chars: str

    @classmethod
    def from_text_chars(cls, chars: set[str] | str) -> "Vocab":
        return cls("".join(sorted(set(chars))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if len(self.chars) <= 256 else torch.int32

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text`; raises KeyError on a character not in the vocabulary."""
        stoi = self.stoi
        return [stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def remap_table(self, target: "Vocab") -> torch.Tensor:
        """A lookup table from this vocabulary's ids to `target`'s ids (-1 where target lacks a char)."""
        stoi = target.stoi
        return torch.tensor([stoi.get(c, -1) for c in self.chars], dtype=torch.int64)


# ---------------------------------------------------------------- reading files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"corpus file not found: {path} (check the path)")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a text file (name the files inside it)")
    if path.stat().st_size == 0:
        raise DataError(f"corpus file is empty: {path}")


def _decode_chunk(raw: bytes, path: Path, offset: int, errors: str, final: bool) -> tuple[str, bytes]:
    """Decode a piece of UTF-8, keeping an incomplete trailing character for the next piece."""
    if not final:
        # a UTF-8 character is at most 4 bytes: back off to a character boundary
        cut = len(raw)
        for back in range(1, min(4, len(raw)) + 1):
            b = raw[-back]
            if b & 0xC0 != 0x80:  # a lead byte or ASCII
                need = 1 if b < 0x80 else 2 if b >> 5 == 0x6 else 3 if b >> 4 == 0xE else 4
                if need > back:
                    cut = len(raw) - back
                break
        raw, rest = raw[:cut], raw[cut:]
    else:
        rest = b""
    if b"\x00" in raw and errors == "strict":
        where = offset + raw.index(b"\x00")
        raise DataError(
            f"{path} looks like a binary file (NUL byte at offset {where}); charrnn trains on UTF-8 text"
        )
    try:
        return raw.decode("utf-8", errors=errors), rest
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start}); "
            "fix the file or pass --encoding-errors replace"
        ) from None


def iter_text(path: Path, errors: str = "strict"):
    """Yield the text of a UTF-8 file in pieces of about CHUNK_BYTES."""
    _check_file(path)
    with open(path, "rb") as f:
        carry, offset = b"", 0
        while True:
            raw = f.read(CHUNK_BYTES)
            final = not raw
            text, carry2 = _decode_chunk(carry + raw, path, offset - len(carry), errors, final)
            offset += len(raw)
            carry = carry2
            if text:
                yield text
            if final:
                return


def is_labeled(path: Path) -> bool:
    """True when the file's first line is the labeled TSV header `label<TAB>text`."""
    _check_file(path)
    with open(path, "rb") as f:
        first = f.readline(64)
    return first.rstrip(b"\r\n").lower() == TSV_HEADER.encode()


@dataclass
class Labeled:
    """The examples of a labeled TSV file."""

    texts: list[str]
    labels: list[int]


def read_labeled(path: Path, errors: str = "strict") -> Labeled:
    """Parse a `label<TAB>text` file; labels are 1/0 or pos/neg. Bad rows are errors with their line number."""
    text = "".join(iter_text(path, errors))
    lines = text.split("\n")
    if lines[0].rstrip("\r").lower() != TSV_HEADER:
        raise DataError(f"{path}: the first line must be the header 'label<TAB>text'")
    texts, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        label, sep, body = line.partition("\t")
        if not sep:
            raise DataError(f"{path}:{n}: malformed row, expected 'label<TAB>text' (no tab found)")
        key = label.strip().lower()
        if key not in LABELS:
            raise DataError(f"{path}:{n}: unknown label {label!r}; labels must be 1/0 or pos/neg")
        if not body.strip():
            raise DataError(f"{path}:{n}: empty text")
        texts.append(body)
        labels.append(LABELS[key])
    if not texts:
        raise DataError(f"{path}: no labeled examples after the header")
    return Labeled(texts, labels)


def iter_corpus_text(path: Path, errors: str = "strict"):
    """The training text of one file: the file itself, or a labeled TSV's texts one per line."""
    if is_labeled(path):
        yield "\n".join(read_labeled(path, errors).texts) + "\n"
    else:
        yield from iter_text(path, errors)


# ---------------------------------------------------------------- encoding and cache


def _cache_key(path: Path, errors: str) -> str:
    st = path.stat()
    ident = f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{errors}"
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def _encode_into(pieces, vocab: Vocab, out: torch.Tensor) -> None:
    """Encode text pieces with `vocab` into the preallocated id tensor `out`."""
    table = torch.full((0x110000,), -1, dtype=torch.int64)
    table[torch.tensor([ord(c) for c in vocab.chars], dtype=torch.int64)] = torch.arange(len(vocab))
    pos = 0
    for text in pieces:
        cps = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        out[pos : pos + cps.numel()] = table[cps.long()].to(out.dtype)
        pos += cps.numel()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_file(path: Path, errors: str = "strict", use_cache: bool = True) -> tuple[torch.Tensor, Vocab]:
    """The file's text as ids in its own vocabulary, from the cache when the file is unchanged.

    The ids tensor is memory-mapped from the cache, so a corpus bigger than memory stays on disk.
    """
    path = Path(path)
    _check_file(path)
    key = _cache_key(path, errors)
    cdir = cache_dir()
    meta_path, bin_path = cdir / f"{key}.json", cdir / f"{key}.bin"
    if use_cache and meta_path.exists() and bin_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            vocab = Vocab(meta["chars"])
            if bin_path.stat().st_size == meta["length"] * vocab.dtype.itemsize:
                ids = torch.from_file(str(bin_path), shared=False, size=meta["length"], dtype=vocab.dtype)
                return ids, vocab
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # a damaged cache entry is rebuilt below
    chars: set[str] = set()
    n = 0
    for piece in iter_corpus_text(path, errors):
        chars.update(piece)
        n += len(piece)
    vocab = Vocab.from_text_chars(chars)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_name(bin_path.name + f".tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        out = torch.from_file(str(tmp), shared=True, size=n, dtype=vocab.dtype)
        _encode_into(iter_corpus_text(path, errors), vocab, out)
        del out
        os.replace(tmp, bin_path)
        _atomic_write_bytes(meta_path, json.dumps({"chars": vocab.chars, "length": n, "source": str(path)}).encode())
        ids = torch.from_file(str(bin_path), shared=False, size=n, dtype=vocab.dtype)
    except (OSError, RuntimeError):
        # no writable cache: encode in memory instead
        ids = torch.empty(n, dtype=vocab.dtype)
        _encode_into(iter_corpus_text(path, errors), vocab, ids)
    return ids, vocab


def load_corpus(paths, vocab: Vocab | None = None, errors: str = "strict") -> tuple[torch.Tensor, Vocab]:
    """Encode one or more files, in order, into one id tensor.

    With `vocab` given (fine-tuning, evaluation), every character must be in it; otherwise the
    vocabulary is the union of the files' characters.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no corpus files given")
    parts = [encode_file(p, errors) for p in paths]
    target = vocab or Vocab.from_text_chars(set().union(*(set(v.chars) for _, v in parts)))
    out = []
    for (ids, own), p in zip(parts, paths):
        if own.chars == target.chars:
            out.append(ids)
            continue
        table = own.remap_table(target)
        if (table < 0).any():
            missing = "".join(c for c, t in zip(own.chars, table.tolist()) if t < 0)
            raise DataError(
                f"{p} has {len(missing)} character(s) the model's vocabulary lacks ({missing[:20]!r}); "
                "train a new model on it instead"
            )
        out.append(table.to(target.dtype)[ids.long()] if ids.numel() else ids.to(target.dtype))
    data = out[0] if len(out) == 1 else torch.cat(out)
    return data, target


# ---------------------------------------------------------------- batching


def split(data: torch.Tensor, val_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - val_frac) of the corpus for training and the LAST val_frac for validation."""
    n_val = int(len(data) * val_frac)
    return data[: len(data) - n_val], data[len(data) - n_val :]


class StreamBatcher:
    """B contiguous streams over the data, read T characters at a time (truncated BPTT).

    Stream b is the b-th of B equal slices of the data; batch i holds characters
    [i*T, i*T + T] of every stream, so the recurrent state of one batch carries into the next.
    After the end of the streams a new epoch starts at position 0 and the state is reset.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.stream_len = len(data) // batch_size
        if self.stream_len < seq_len + 1:
            raise DataError(
                f"the training text has {len(data)} characters, fewer than one batch needs "
                f"({batch_size} streams x {seq_len + 1}); use a longer corpus or smaller --batch-size/--seq-len"
            )
        self.streams = data[: self.stream_len * batch_size].view(batch_size, self.stream_len)
        self.batches_per_epoch = (self.stream_len - 1) // seq_len

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch number `index` (counted from the start of training): inputs, targets, epoch_start."""
        i = index % self.batches_per_epoch
        p = i * self.seq_len
        chunk = self.streams[:, p : p + self.seq_len + 1].long()  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:], i == 0
