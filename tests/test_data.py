"""Corpus reading, vocabulary, cache and the stream batcher."""

import hashlib
import os

import pytest
import torch

from charrnn.data import StreamBatcher, Vocab, encode, encode_file, is_labeled, load_corpus, read_labeled, split
from charrnn.errors import DataError


def test_vocab_roundtrip_and_dtype():
    v = Vocab.from_text_chars("hello world")
    assert v.chars == " dehlorw"
    assert v.decode(v.encode("world")) == "world"
    assert v.dtype == torch.uint8
    big = Vocab.from_text_chars("".join(chr(0x4E00 + i) for i in range(300)))
    assert big.dtype == torch.int32


def test_encode_file_is_cached_and_memory_mapped(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcabc\nxyz é", encoding="utf-8")
    ids, vocab = encode_file(p)
    assert vocab.decode(ids.tolist()) == "abcabc\nxyz é"
    cache = list((tmp_path / ".cache").glob("*.bin"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime_ns
    ids2, _ = encode_file(p)  # served from the cache: the file is not rewritten
    assert cache[0].stat().st_mtime_ns == mtime and torch.equal(ids, ids2)
    # a changed file is re-encoded
    p.write_text("new text", encoding="utf-8")
    os.utime(p, ns=(mtime + 10**9, mtime + 10**9))
    ids3, v3 = encode_file(p)
    assert v3.decode(ids3.tolist()) == "new text"


def test_large_file_encoded_in_chunks(tmp_path, monkeypatch):
    import charrnn.data as data

    monkeypatch.setattr(data, "CHUNK_BYTES", 7)  # forces multi-byte characters to straddle chunks
    text = "naïve café — ünïcödé ✓ " * 20
    p = tmp_path / "u.txt"
    p.write_text(text, encoding="utf-8")
    ids, vocab = encode_file(p)
    assert vocab.decode(ids.tolist()) == text


def test_several_files_share_one_vocabulary(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aaa bbb\n")
    b.write_text("zzz yy\n")
    ids, vocab = load_corpus([a, b])
    assert vocab.decode(ids.tolist()) == "aaa bbb\nzzz yy\n"
    assert set(vocab.chars) == set("ab zy\n")


def test_load_with_given_vocab_rejects_unknown_chars(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("abc!")
    with pytest.raises(DataError, match="vocabulary lacks"):
        load_corpus([p], vocab=Vocab("abc"))


def test_labeled_tsv_is_read_as_text(tmp_path):
    p = tmp_path / "r.tsv"
    p.write_text("label\ttext\n1\tgreat film\n0\tawful\npos\tnice\n")
    lab = read_labeled(p)
    assert lab.labels == [1, 0, 1] and lab.texts == ["great film", "awful", "nice"]
    ids, vocab = load_corpus([p])
    assert vocab.decode(ids.tolist()) == "great film\nawful\nnice\n"


@pytest.mark.parametrize("body,msg", [
    ("label\ttext\n1 no tab here\n", "no tab"),
    ("label\ttext\nmaybe\tso so\n", "unknown label"),
])
def test_bad_tsv_rows_name_the_line(tmp_path, body, msg):
    p = tmp_path / "bad.tsv"
    p.write_text(body)
    with pytest.raises(DataError, match=f":2: .*{msg}"):
        read_labeled(p)


def test_invalid_utf8_reports_offset_and_replace_works(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match="offset 6"):
        encode_file(p)
    ids, vocab = encode_file(p, errors="replace")
    assert vocab.decode(ids.tolist()) == "hello \ufffd world"


def test_split_holds_out_the_end():
    data = torch.arange(100)
    tr, va = split(data, 0.1)
    assert torch.equal(va, torch.arange(90, 100)) and len(tr) == 90


def test_stream_batcher_streams_are_contiguous():
    data = torch.arange(1000)
    b = StreamBatcher(data, batch_size=4, seq_len=10)
    x0, y0, start0 = b.get(0)
    x1, y1, start1 = b.get(1)
    assert start0 and not start1
    assert x0.shape == (4, 10)
    # targets are inputs shifted by one; batch 1 continues batch 0 in every stream
    assert torch.equal(y0[:, :-1], x0[:, 1:])
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)
    # stream b starts at b * stream_len
    assert x0[:, 0].tolist() == [0, 250, 500, 750]
    # the first pass starts at the slices' starts; the next one further in, with the state reset
    assert b.offset(0) == 0
    x_next, _, start_next = b.get(b.batches_per_epoch)
    assert start_next
    assert x_next[:, 0].tolist() == [250 * s + b.offset(1) for s in range(4)] and b.offset(1) > 0


def test_stream_batcher_starts_each_pass_elsewhere_and_wraps_round():
    """Passes cut the text at other places: each starts its streams at another offset (the last stream runs
    round to the start of the data), reads every stream contiguously, and depends only on the step."""
    data = torch.arange(1000)
    b = StreamBatcher(data, batch_size=4, seq_len=10)
    offsets = [b.offset(e) for e in range(12)]
    assert len(set(offsets)) == 12 and all(0 <= o < 250 for o in offsets)
    assert len({o % 10 for o in offsets}) > 5  # the windows end at other characters too
    wrapping = next(e for e in range(1, 12) if b.offset(e) + b.batches_per_epoch * 10 >= 250)
    first = wrapping * b.batches_per_epoch
    seen = [b.get(k) for k in range(first, first + b.batches_per_epoch)]
    assert seen[0][2] and not any(start for _, _, start in seen[1:])
    xs = torch.cat([x for x, _, _ in seen], dim=1)  # (4, the pass's characters per stream)
    ys = torch.cat([y for _, y, _ in seen], dim=1)
    assert torch.equal(xs[:, 0], torch.arange(4) * 250 + b.offset(wrapping))
    assert torch.equal(ys, (xs + 1) % 1000)  # targets follow inputs, 999 then 0 where the last stream wraps
    assert torch.equal(xs[:, 1:], (xs[:, :-1] + 1) % 1000)  # each stream contiguous across its batches
    assert 999 in xs[3].tolist() and 0 in xs[3].tolist()
    again = StreamBatcher(data, batch_size=4, seq_len=10)  # a resumed run: the same step gives the same batch
    assert torch.equal(again.get(first + 3)[0], seen[3][0])


def test_stream_batcher_rejects_too_short_corpus():
    with pytest.raises(DataError, match="fewer than one batch"):
        StreamBatcher(torch.arange(50), batch_size=8, seq_len=16)


def test_a_rewrite_keeping_size_and_mtime_is_encoded_again(tmp_path):
    """`cp -p`, `rsync -t`, `touch -r` or a rewrite within one clock tick keep size and mtime; the
    cache is keyed on the bytes, so the new text is used."""
    p = tmp_path / "t.txt"
    p.write_text("the old text\n")
    st = p.stat()
    ids, vocab = encode_file(p)
    assert vocab.decode(ids.tolist()) == "the old text\n"
    p.write_text("the new text\n")  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    ids, vocab = encode_file(p)
    assert vocab.decode(ids.tolist()) == "the new text\n"


def test_the_cache_is_keyed_on_content_not_path(tmp_path):
    import shutil

    a = tmp_path / "a.txt"
    a.write_text("same bytes in two places\n")
    first = encode(a)
    b = tmp_path / "sub" / "b.txt"
    b.parent.mkdir()
    shutil.copy2(a, b)
    second = encode(b)
    assert first.sha256 == second.sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    assert len(list((tmp_path / ".cache").glob("*.bin"))) == 1  # the copy was served from the first's entry
    assert torch.equal(first.ids, second.ids)


def test_a_leading_byte_order_mark_is_dropped(tmp_path):
    plain = tmp_path / "bom.txt"
    plain.write_bytes("\ufeffhello world\n".encode())
    ids, vocab = encode_file(plain)
    assert vocab.decode(ids.tolist()) == "hello world\n" and "\ufeff" not in vocab.chars
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes("\ufefflabel\ttext\n1\tgreat film\n0\tawful\n".encode())
    assert is_labeled(tsv)
    assert read_labeled(tsv).texts == ["great film", "awful"]
    ids, vocab = load_corpus([tsv])
    assert vocab.decode(ids.tolist()) == "great film\nawful\n"
    only = tmp_path / "only_bom.txt"
    only.write_bytes("\ufeff".encode())
    with pytest.raises(DataError, match="no text"):
        encode_file(only)
