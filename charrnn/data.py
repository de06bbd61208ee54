"""Corpus reading, the character vocabulary, the encoded-corpus cache and the stream batcher."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from charrnn import cache
from charrnn.cache import cache_dir  # noqa: F401  (where it always was)
from charrnn.errors import DataError

CHUNK_BYTES = 16 << 20  # read and encode big files in pieces so memory stays flat
TSV_HEADER = "label\ttext"
LABELS = {"1": 1, "0": 0, "pos": 1, "neg": 0}
BOM = "\ufeff"  # a byte-order mark some editors put at the start of a UTF-8 file: not part of the text


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


def iter_text(path: Path, errors: str = "strict", hasher=None):
    """Yield the text of a UTF-8 file in pieces of about CHUNK_BYTES, without a leading byte-order mark.

    `hasher` (a hashlib object), when given, is fed every byte read.
    """
    _check_file(path)
    with open(path, "rb") as f:
        carry, offset, first = b"", 0, True
        while True:
            raw = f.read(CHUNK_BYTES)
            if hasher is not None:
                hasher.update(raw)
            final = not raw
            text, carry2 = _decode_chunk(carry + raw, path, offset - len(carry), errors, final)
            offset += len(raw)
            carry = carry2
            if first and text:
                first = False
                text = text.removeprefix(BOM)
            if text:
                yield text
            if final:
                return


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (what `sha256sum` prints): the corpus's fingerprint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def is_labeled(path: Path) -> bool:
    """True when the file's first line is the labeled TSV header `label<TAB>text` (after a byte-order mark)."""
    _check_file(path)
    with open(path, "rb") as f:
        first = f.readline(64)
    return first.removeprefix(BOM.encode()).rstrip(b"\r\n").lower() == TSV_HEADER.encode()


@dataclass
class Labeled:
    """The examples of a labeled TSV file."""

    texts: list[str]
    labels: list[int]


def read_labeled(path: Path, errors: str = "strict", hasher=None) -> Labeled:
    """Parse a `label<TAB>text` file; labels are 1/0 or pos/neg. Bad rows are errors with their line number."""
    text = "".join(iter_text(path, errors, hasher))
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


def iter_corpus_text(path: Path, errors: str = "strict", hasher=None):
    """The training text of one file: the file itself, or a labeled TSV's texts one per line."""
    if is_labeled(path):
        yield "\n".join(read_labeled(path, errors, hasher).texts) + "\n"
    else:
        yield from iter_text(path, errors, hasher)


# ---------------------------------------------------------------- encoding and cache


def _encode_into(pieces, vocab: Vocab, out: torch.Tensor) -> int:
    """Encode text pieces with `vocab` into the preallocated id tensor `out`; returns the characters seen
    (more than `out` holds when the text grew since it was measured: those are not written)."""
    table = torch.full((0x110000,), -1, dtype=torch.int64)
    table[torch.tensor([ord(c) for c in vocab.chars], dtype=torch.int64)] = torch.arange(len(vocab))
    pos = 0
    for text in pieces:
        cps = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        take = max(0, min(cps.numel(), out.numel() - pos))
        out[pos : pos + take] = table[cps[:take].long()].to(out.dtype)
        pos += cps.numel()
    return pos


@dataclass
class Encoded:
    """One corpus file's text as ids in its own vocabulary, and the SHA-256 of the file's bytes."""

    path: Path
    ids: torch.Tensor
    vocab: Vocab
    sha256: str


def encode(path: Path, errors: str = "strict", use_cache: bool = True) -> Encoded:
    """A file's text as ids, from the cache when a file with the same bytes was encoded before.

    The ids tensor is memory-mapped from the cache, so a corpus bigger than memory stays on disk.
    The file is read once to fingerprint it (far cheaper than encoding); a miss reads it twice more,
    for the vocabulary and then for the ids, and the bytes of that last pass must hash to the same
    fingerprint, so a file rewritten meanwhile is never cached under the old one.
    """
    path = Path(path)
    _check_file(path)
    sha = file_sha256(path)
    if use_cache:
        cache.sweep()  # temp files of encodes that were killed
        hit = cache.lookup(sha, errors)
        if hit is not None:
            return Encoded(path, hit[0], Vocab(hit[1]), sha)
    chars: set[str] = set()
    n = 0
    for piece in iter_corpus_text(path, errors):
        chars.update(piece)
        n += len(piece)
    if n == 0:
        raise DataError(f"corpus file has no text: {path} (only a byte-order mark)")
    vocab = Vocab.from_text_chars(chars)

    def fill(out: torch.Tensor) -> None:
        h = hashlib.sha256()
        if _encode_into(iter_corpus_text(path, errors, h), vocab, out) != n or h.hexdigest() != sha:
            raise DataError(f"{path} changed while it was being read; run again once nothing is writing to it")

    if use_cache:
        try:
            return Encoded(path, cache.store(sha, errors, vocab.chars, n, path, fill), vocab, sha)
        except (OSError, RuntimeError):
            pass  # no writable cache: encode in memory instead
    ids = torch.empty(n, dtype=vocab.dtype)
    fill(ids)
    return Encoded(path, ids, vocab, sha)


def encode_file(path: Path, errors: str = "strict", use_cache: bool = True) -> tuple[torch.Tensor, Vocab]:
    """(ids, vocabulary) of one file; see `encode`."""
    e = encode(path, errors, use_cache)
    return e.ids, e.vocab


def join_encoded(parts: list[Encoded], vocab: Vocab | None = None) -> tuple[torch.Tensor, Vocab]:
    """Encoded files, in order, as one id tensor in one vocabulary.

    With `vocab` given (fine-tuning, evaluation, resuming), every character must be in it; otherwise
    the vocabulary is the union of the files' characters.
    """
    if not parts:
        raise DataError("no corpus files given")
    target = vocab or Vocab.from_text_chars(set().union(*(set(e.vocab.chars) for e in parts)))
    out = []
    for e in parts:
        ids, own, p = e.ids, e.vocab, e.path
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


def load_corpus(paths, vocab: Vocab | None = None, errors: str = "strict") -> tuple[torch.Tensor, Vocab]:
    """Encode one or more files, in order, into one id tensor (see `join_encoded` for `vocab`)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no corpus files given")
    return join_encoded([encode(p, errors) for p in paths], vocab)


# ---------------------------------------------------------------- batching


def split(data: torch.Tensor, val_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - val_frac) of the corpus for training and the LAST val_frac for validation."""
    n_val = int(len(data) * val_frac)
    return data[: len(data) - n_val], data[len(data) - n_val :]


PASS_STRIDE = (5**0.5 - 1) / 2  # StreamBatcher.offset: each pass starts this share of a stream after the one before


class StreamBatcher:
    """B contiguous streams over the data, read T characters at a time (truncated BPTT).

    Stream b is the b-th of B equal slices of the data; batch i holds characters
    [i*T, i*T + T] of every stream, so the recurrent state of one batch carries into the next.
    After the end of the streams a new pass (epoch) starts and the state is reset. Each pass
    after the first starts its streams `offset(epoch)` characters further into the data (the last
    stream wraps round to the start), so the passes do not cut the text at the same places: the
    streams begin, and the windows end, at other characters each time. Where a pass starts is a
    function of its number only, so a resumed run reads what it would have read.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.stream_len = len(data) // batch_size
        if self.stream_len < seq_len + 1:
            raise DataError(
                f"the training text has {len(data)} characters, fewer than one batch needs "
                f"({batch_size} streams x {seq_len + 1}); use a longer corpus or smaller --batch-size/--seq-len"
            )
        self.flat = data[: self.stream_len * batch_size]
        self.streams = self.flat.view(batch_size, self.stream_len)
        self.batches_per_epoch = (self.stream_len - 1) // seq_len

    def offset(self, epoch: int) -> int:
        """Where pass `epoch` starts each stream, in characters past its slice's start: 0 for the first pass,
        then the fractional parts of epoch x 0.618... (the golden ratio's), which spread any number of
        passes evenly over the stream's length."""
        return int(((epoch * PASS_STRIDE) % 1.0) * self.stream_len)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Batch number `index` (counted from the start of training): inputs, targets, epoch_start."""
        epoch, i = divmod(index, self.batches_per_epoch)
        p = i * self.seq_len + self.offset(epoch)
        if p + self.seq_len < self.stream_len:  # no stream reaches past its slice: one slice of the view
            chunk = self.streams[:, p : p + self.seq_len + 1]
        else:  # the streams run into the next slice; the last one round to the start of the data
            starts = torch.arange(self.batch_size) * self.stream_len + p
            chunk = self.flat[(starts[:, None] + torch.arange(self.seq_len + 1)) % len(self.flat)]
        chunk = chunk.long()  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:], i == 0
