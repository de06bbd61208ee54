"""TensorBoard logs without TensorFlow: scalar events, hand-encoded, in TFRecord files (`train --tensorboard DIR`).

An event file is a sequence of records: length (uint64 LE), its masked CRC-32C, the bytes, their masked
CRC-32C. Each record is one `Event` protobuf (tensorflow/core/util/event.proto): wall_time (field 1,
double), step (2, int64), file_version (3, string), summary (5: Summary, whose repeated field 1 is a
Value with tag (1, string) and simple_value (2, float)) or session_log (7: SessionLog, status field 1).
Those few fields are all a scalar needs, so they are written by hand here rather than through the
protobuf and tensorboard packages; `read_events` reads them back (the tests check it against
TensorBoard's own reader too).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

from charrnn.errors import CharRNNError, DataError
from charrnn.events import EndEvent, EvalEvent, StartEvent, StepEvent, TrainEvents

FILE_VERSION = b"brain.Event:2"
SESSION_START = 1  # SessionLog.status START: TensorBoard drops the events at and after its step (a restart)

# ---------------------------------------------------------------- CRC-32C (Castagnoli), as TFRecord frames use it


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # the reflected Castagnoli polynomial
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant, so CRCs of CRCs do not degenerate."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: the length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


# ---------------------------------------------------------------- protobuf wire format (the fields used here)

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes it (a negative one takes ten bytes)
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _message(field: int, body: bytes) -> bytes:
    return _key(field, BYTES) + _varint(len(body)) + body


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    return _key(1, FIXED64) + struct.pack("<d", wall_time) + _key(2, VARINT) + _varint(step) + body


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    value_msg = _message(1, tag.encode()) + _key(2, FIXED32) + struct.pack("<f", value)
    return _event(wall_time, step, _message(5, _message(1, value_msg)))


def version_event(wall_time: float) -> bytes:
    return _key(1, FIXED64) + struct.pack("<d", wall_time) + _message(3, FILE_VERSION)


def session_start_event(step: int, wall_time: float) -> bytes:
    return _event(wall_time, step, _message(7, _key(1, VARINT) + _varint(SESSION_START)))


def _fields(buf: bytes):
    """(field number, wire type, value) of each field of one message; BYTES values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, i = _read_varint(buf, i)
        elif wire == FIXED64:
            value, i = buf[i:i + 8], i + 8
        elif wire == FIXED32:
            value, i = buf[i:i + 4], i + 4
        elif wire == BYTES:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        yield field, wire, value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


# ---------------------------------------------------------------- files


def read_events(path: Path) -> list[dict]:
    """The events of one file, CRCs checked: {"wall_time", "step", and "file_version", "session_start"
    or "scalars" ({tag: value})}. A damaged file is one line (DataError)."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        head = data[i:i + 12]
        if len(head) < 12 or struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
            raise DataError(f"{path}: damaged TensorBoard record at byte {i}")
        n = struct.unpack("<Q", head[:8])[0]
        body, crc = data[i + 12:i + 12 + n], data[i + 12 + n:i + 16 + n]
        if len(crc) < 4 or struct.unpack("<I", crc)[0] != masked_crc(body):
            raise DataError(f"{path}: damaged TensorBoard record at byte {i}")
        out.append(_decode_event(body))
        i += 16 + n
    return out


def _decode_event(body: bytes) -> dict:
    event = {"wall_time": 0.0, "step": 0}
    for field, _, value in _fields(body):
        if field == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            scalars = event.setdefault("scalars", {})
            for _, _, v in _fields(value):
                parts = {f: x for f, _, x in _fields(v)}
                if 2 in parts:
                    scalars[parts.get(1, b"").decode()] = struct.unpack("<f", parts[2])[0]
        elif field == 7:
            event["session_start"] = any(f == 1 and v == SESSION_START for f, _, v in _fields(value))
    return event


_counter = itertools.count()


class EventWriter:
    """One event file in `folder`, named as TensorBoard looks for them; each event is flushed as written,
    so a TensorBoard watching the folder sees the run as it goes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_counter)}"
        self.path = self.folder / name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "ab")
        except OSError as e:
            raise CharRNNError(f"cannot write TensorBoard logs to {self.folder}: {e.strerror or e}; "
                               "choose a writable folder with --tensorboard") from None
        self._write(version_event(time.time()))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._write(scalar_event(tag, value, step, time.time()))

    def session_start(self, step: int) -> None:
        self._write(session_start_event(step, time.time()))

    def _write(self, event: bytes) -> None:
        try:
            self.file.write(frame(event))
            self.file.flush()
        except OSError as e:
            raise CharRNNError(f"could not write {self.path}: {e.strerror or e}; free some disk space "
                               "(the run's checkpoints are not affected)") from None

    def close(self) -> None:
        self.file.close()


class TensorBoardEvents(TrainEvents):
    """A training-events receiver that logs the run's scalars under DIR/RUN_NAME: train loss, learning
    rate and chars/s at each step report, validation loss at each evaluation. One folder per run, so
    `tensorboard --logdir DIR` compares the runs logged there."""

    TAGS = {"train": "loss/train", "val": "loss/val", "lr": "lr", "speed": "chars_per_s"}

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.writer: EventWriter | None = None
        try:  # a folder that cannot be made is said before the run starts
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CharRNNError(f"cannot write TensorBoard logs to {self.folder}: {e.strerror or e}; "
                               "choose a writable folder with --tensorboard") from None

    def on_start(self, e: StartEvent) -> None:
        self.writer = EventWriter(self.folder / e.run_dir.name)
        if e.resumed_from:  # TensorBoard then drops what an earlier session logged after the checkpoint
            self.writer.session_start(e.resumed_from + 1)

    def on_step(self, e: StepEvent) -> None:
        if self.writer is not None:
            self.writer.scalar(self.TAGS["train"], e.loss, e.step)
            self.writer.scalar(self.TAGS["lr"], e.lr, e.step)
            self.writer.scalar(self.TAGS["speed"], e.chars_per_s, e.step)

    def on_eval(self, e: EvalEvent) -> None:
        if self.writer is not None:
            self.writer.scalar(self.TAGS["val"], e.val_loss, e.step)

    def on_end(self, e: EndEvent) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
