"""The encoded-corpus cache and the corpus fingerprint: killed encodes leave nothing behind for ever,
`charrnn cache list|clear`, and `train --resume` refusing a corpus whose bytes changed."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

from charrnn import checkpoint as ckm
from charrnn.data import encode
from conftest import TINY, cut_after, make_text
from test_reliability import cli, start, wait_for
from test_runs import charrnn_error, dead_pid

HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def cache_temps(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / ".cache").glob("*.tmp*"))


def test_a_killed_encode_leaves_no_temp_file_behind(tmp_path):
    """A real `charrnn train` killed while it encodes its corpus; the next run sweeps its temp file."""
    big = tmp_path / "big.txt"
    big.write_text(make_text(3_000_000))
    proc = start(["train", big, *TINY, "--steps", "1"], tmp_path)
    assert wait_for(lambda: cache_temps(tmp_path), proc, poll=0.0005), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = cache_temps(tmp_path)
    assert left and all(p.name.endswith(f".tmp{proc.pid}") for p in left)
    small = tmp_path / "small.txt"
    small.write_text("another corpus\n")
    encode(small)  # the next run, on any corpus
    assert not cache_temps(tmp_path)


def test_the_sweep_and_clear_leave_a_running_encode_alone(tmp_path):
    """A temp file whose writer is alive is kept, whether its pid is visible here or not (another machine
    sharing the cache): the writer holds its flock."""
    (tmp_path / ".cache").mkdir()
    live = tmp_path / ".cache" / f"v2-{'0' * 32}-strict.bin.tmp{dead_pid()}"  # a pid that means nothing here
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        stale = tmp_path / ".cache" / f"v2-{'1' * 32}-strict.bin.tmp{dead_pid()}"
        stale.write_bytes(b"\0" * 100)
        p = tmp_path / "c.txt"
        p.write_text("some text\n")
        encode(p)
        assert live.exists() and not stale.exists()
        r = cli("cache", "clear")
        assert r.exit_code == 0, r.output
        assert "1 file(s) being written by a running encode left alone" in r.stderr, r.stderr
        assert [q.name for q in (tmp_path / ".cache").iterdir()] == [live.name]
    finally:
        holder.stdin.close()
        holder.wait()
    encode(p)
    assert not live.exists()  # its writer is gone now


def test_cache_list_and_clear(tmp_path, corpus):
    r = cli("cache", "list")
    assert r.exit_code == 0 and "is empty" in r.stderr
    assert cli("train", corpus, *TINY, "--steps", "2").exit_code == 0
    r = cli("cache", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    text = corpus.read_text()
    assert len(rows) == 1 and rows[0]["source"] == str(corpus.resolve())
    assert rows[0]["chars"] == len(text) and rows[0]["vocab_size"] == len(set(text)) and rows[0]["current"]
    on_disk = sum(p.stat().st_size for p in (tmp_path / ".cache").iterdir())
    assert rows[0]["bytes"] == on_disk
    r = cli("cache", "list")
    assert r.exit_code == 0 and "corpus.txt" in r.stderr and f"{len(text):,}" in r.stderr, r.stderr
    r = cli("cache", "clear")
    assert r.exit_code == 0, r.output
    assert "2 file(s)" in r.stderr and "freed" in r.stderr, r.stderr
    assert not any((tmp_path / ".cache").iterdir())
    assert "is empty" in cli("cache", "list").stderr


# ---------------------------------------------------------------- the fingerprint in checkpoints


def test_resume_refuses_a_changed_corpus_unless_allowed(tmp_path, corpus):
    run = tmp_path / "run"
    assert cli("train", corpus, *TINY, "--steps", "16", "--eval-every", "8", "--keep", "5", "--run", run).exit_code == 0
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert ckm.load(run / ckm.ckpt_name(16))["train"]["corpus_sha256"] == [sha]
    cut_after(run, 8)
    st = corpus.stat()
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(reversed(lines)))  # the same size and characters, other text
    import os

    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 1, r.output
    line = charrnn_error(r.stderr)
    assert f"the corpus file {corpus.resolve()} changed since the run started" in line, line
    assert f"'charrnn train --resume {run} --allow-changed-corpus'" in line
    assert [i.step for i in ckm.list_checkpoints(run)] == [8]  # nothing happened
    r = cli("train", "--resume", run, "-q", "--allow-changed-corpus")
    assert r.exit_code == 0, r.output
    assert "changed since the run started; going on with its new text" in r.stderr
    new_sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert ckm.load(run / ckm.ckpt_name(16))["train"]["corpus_sha256"] == [new_sha]
    r = cli("train", corpus, *TINY, "--steps", "2", "--allow-changed-corpus")
    assert r.exit_code == 2 and "goes with --resume" in r.stderr


def test_a_run_without_fingerprints_resumes_as_before(tmp_path, corpus):
    """Checkpoints written before fingerprints were kept hold none: their corpus is not checked."""
    from charrnn.config import TrainConfig
    from charrnn.train import Trainer

    run = tmp_path / "run"
    t = Trainer.new([corpus], TrainConfig(hidden=32, layers=1, seq_len=16, batch_size=8, steps=16, eval_every=8,
                                          keep=5, threads=1), run_dir=run)
    t.corpus_sha256 = None
    t.run()
    assert ckm.load(run / ckm.ckpt_name(8))["train"].get("corpus_sha256") is None
    cut_after(run, 8)
    corpus.write_text(corpus.read_text()[::-1])
    r = cli("train", "--resume", run, "-q")
    assert r.exit_code == 0, r.output
    assert ckm.list_checkpoints(run)[-1].step == 16
