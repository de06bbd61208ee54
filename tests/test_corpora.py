"""Corpus catalogue and downloads: served over HTTP on 127.0.0.1 from the shared corpora, from folders, and broken; an installed copy."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from charrnn import corpora
from conftest import SHARED, TINY, make_text, run_cli

REPO = Path(__file__).resolve().parent.parent
SMALL = "uci_yelp_labelled"  # 61 KB: keeps the HTTP tests fast
SMALL_FILE = "uci_yelp_labelled.tsv"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class CutOffHandler(QuietHandler):
    """Announces the whole file, sends half of it, then drops the connection: an interrupted download."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def serve(directory: Path, handler=QuietHandler):
    """An HTTP server on 127.0.0.1 (a free port) serving directory; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def the_error(r) -> str:
    """The one error line a failed command wrote (progress lines may come before it)."""
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def catalog() -> corpora.Catalog:
    return corpora.load_catalog()


@pytest.fixture(autouse=True)
def no_env_mirror(monkeypatch):
    monkeypatch.delenv("CHARRNN_MIRROR", raising=False)


# ---------------------------------------------------------------- the catalogue


def test_catalog_matches_the_shared_files(catalog):
    assert {"tinyshakespeare", "warpeace", "rt_polarity", "sst2_train", "sst2_dev", "sst2_test",
            "uci_amazon_cells_labelled", "uci_imdb_labelled", "uci_yelp_labelled"} <= set(catalog.entries)
    assert sum(n.startswith("imdb_train_") for n in catalog.entries) == 10
    assert sum(n.startswith("imdb_test_sample_") for n in catalog.entries) == 2
    assert sum(n.startswith("amazon_multidomain_") for n in catalog.entries) == 4
    for e in catalog.entries.values():
        f = SHARED / e.file
        assert f.stat().st_size == e.bytes, e.name
        assert sha256(f) == e.sha256, e.name
        assert e.format == ("text" if f.suffix == ".txt" else "labeled")
        assert e.licence and e.citation and e.source.startswith("https://")
    assert catalog.entries["tinyshakespeare"].url.startswith("https://raw.githubusercontent.com/karpathy/char-rnn/")
    assert len(catalog.groups["imdb_train"].members) == 10


def test_catalog_ships_in_the_package_and_downloads_stay_out_of_git():
    assert Path(corpora.__file__).with_name("catalog.json").is_file()
    assert "catalog.json" in (REPO / "pyproject.toml").read_text()  # declared as package data
    out = subprocess.run(["git", "check-ignore", "-q", "charrnn/catalog.json"], cwd=REPO)
    assert out.returncode == 1  # 1 = not ignored
    out = subprocess.run(["git", "check-ignore", "-q", "corpora/tinyshakespeare.txt"], cwd=REPO)
    assert out.returncode == 0  # downloads are ignored
    assert subprocess.run(["git", "ls-files", "--error-unmatch", "corpora/.gitkeep"], cwd=REPO,
                          capture_output=True).returncode == 0  # the download folder exists in a clone


def test_corpus_list_table_and_json(tmp_path):
    r = run_cli("corpus", "list")
    assert r.exit_code == 0
    assert "tinyshakespeare" in r.stderr and "imdb_train" in r.stderr and "mirror" in r.stderr
    assert r.stdout == ""  # tables go to stderr
    r = run_cli("corpus", "list", "--json")
    assert r.exit_code == 0
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    by_name = {row["name"]: row for row in rows}
    assert by_name["sst2_dev"]["format"] == "labeled" and by_name["sst2_dev"]["present"] is False
    assert by_name["sst2"]["kind"] == "group" and by_name["sst2"]["members"] == ["sst2_train", "sst2_dev", "sst2_test"]


# ---------------------------------------------------------------- downloads


def test_get_over_http_arrives_verified_then_is_not_downloaded_again(tmp_path):
    with serve(SHARED) as url:
        r = run_cli("corpus", "get", SMALL, "--mirror", url)
        assert r.exit_code == 0, r.stderr
        path = Path(r.stdout.strip())
        assert path == Path("corpora") / SMALL_FILE
        assert sha256(path) == sha256(SHARED / SMALL_FILE)
        assert leftovers(tmp_path / "corpora") == [SMALL_FILE]  # no temporary file left
        mtime = path.stat().st_mtime_ns
        r = run_cli("corpus", "get", SMALL, "--mirror", url)
    assert r.exit_code == 0
    assert "already here" in r.stderr and r.stdout.strip() == str(path)
    assert path.stat().st_mtime_ns == mtime


def test_mirror_from_the_environment_and_a_group(tmp_path, monkeypatch):
    with serve(SHARED) as url:
        monkeypatch.setenv("CHARRNN_MIRROR", url + "/")
        r = run_cli("corpus", "get", "uci", "--dir", "data")
    assert r.exit_code == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in paths] == ["uci_amazon_cells_labelled.tsv", "uci_imdb_labelled.tsv", "uci_yelp_labelled.tsv"]
    assert all(p.parent == Path("data") and sha256(p) == sha256(SHARED / p.name) for p in paths)


def test_folder_mirror(tmp_path):
    r = run_cli("corpus", "get", SMALL, "--mirror", SHARED)
    assert r.exit_code == 0, r.stderr
    assert sha256(Path(r.stdout.strip())) == sha256(SHARED / SMALL_FILE)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_corrupted_copy_is_refused_and_leaves_nothing(tmp_path, damage):
    bad = tmp_path / "badmirror"
    bad.mkdir()
    data = bytearray((SHARED / SMALL_FILE).read_bytes())
    if damage == "flip_a_byte":
        data[1000] ^= 0x01
    else:
        data = data[:-100]
    (bad / SMALL_FILE).write_bytes(bytes(data))
    with serve(bad) as url:
        r = run_cli("corpus", "get", SMALL, "--mirror", url)
    assert r.exit_code == 1
    assert r.stdout == ""
    msg = the_error(r)
    assert "nothing was saved" in msg
    assert ("SHA-256" in msg) if damage == "flip_a_byte" else ("61,231 bytes" in msg)
    assert leftovers(tmp_path / "corpora") == []


def test_interrupted_download_leaves_nothing_and_says_so(tmp_path):
    with serve(SHARED, CutOffHandler) as url:
        r = run_cli("corpus", "get", SMALL, "--mirror", url)
    assert r.exit_code == 1
    msg = the_error(r)
    assert "interrupted" in msg and "run the command again" in msg
    assert leftovers(tmp_path / "corpora") == []


def test_a_wrong_file_in_place_is_replaced_by_the_verified_copy(tmp_path):
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / SMALL_FILE).write_text("not the corpus\n")
    r = run_cli("corpus", "get", SMALL, "--mirror", SHARED)
    assert r.exit_code == 0
    assert "another checksum" in r.stderr
    assert sha256(tmp_path / "corpora" / SMALL_FILE) == sha256(SHARED / SMALL_FILE)


def test_unreachable_mirror_gives_one_clear_line(tmp_path):
    r = run_cli("corpus", "get", SMALL, "--mirror", f"http://127.0.0.1:{closed_port()}")
    assert r.exit_code == 1
    msg = the_error(r)
    assert len(r.stderr.strip().splitlines()) == 1
    assert msg.startswith("error: cannot reach the mirror 127.0.0.1") and "--mirror" in msg and "CHARRNN_MIRROR" in msg
    assert leftovers(tmp_path / "corpora") == []


def test_mirror_missing_the_file_and_corpus_without_direct_url(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as url:
        r = run_cli("corpus", "get", SMALL, "--mirror", url)
    assert r.exit_code == 1 and "HTTP 404" in r.stderr
    r = run_cli("corpus", "get", SMALL, "--mirror", empty)
    assert r.exit_code == 1 and f"has no {SMALL_FILE}" in r.stderr
    r = run_cli("corpus", "get", "sst2_train")  # no mirror and no direct URL: says how to use one
    assert r.exit_code == 1 and "no direct download" in r.stderr and "CHARRNN_MIRROR" in r.stderr
    r = run_cli("corpus", "get", "sst_train")
    assert r.exit_code == 2 and "sst2_train" in r.stderr
    assert leftovers(tmp_path / "corpora") == []


# ---------------------------------------------------------------- corpus patterns in train


def test_train_expands_a_quoted_glob_and_refuses_an_empty_one(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text(make_text(6000, seed=1))
    (d / "b.txt").write_text(make_text(6000, seed=2))
    r = run_cli("train", str(d / "*.txt"), "--steps", "2", "--run", "run", *TINY)
    assert r.exit_code == 0, r.stderr
    r = run_cli("checkpoints", "show", "run", "--json")
    assert [Path(p).name for p in json.loads(r.stdout)["corpus"]] == ["a.txt", "b.txt"]
    r = run_cli("train", str(d / "*.md"), "--steps", "2", *TINY)
    assert r.exit_code == 1
    assert "no file matches" in the_error(r)


# ---------------------------------------------------------------- an installed (non-editable) charrnn


def test_a_non_editable_install_lists_and_gets_corpora_from_another_folder(tmp_path):
    """`pip install .` as a user does it: the catalogue must travel inside the package.

    The source is copied (so uncommitted changes count), built and installed into a --target folder
    without network (torch and typer come from the test environment); then, from a folder with no
    charrnn source in it, `corpus list` and `corpus get` must work from the installed copy alone.
    """
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "checkpoints", "corpora", ".pytest_cache"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert (target / "charrnn" / "catalog.json").is_file()
    shutil.rmtree(src)  # nothing but the installed copy is left to find the catalogue in
    user = tmp_path / "elsewhere"
    user.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "CHARRNN_CACHE": str(tmp_path / "cache")}
    env.pop("CHARRNN_MIRROR", None)

    def charrnn(*args):
        return subprocess.run([sys.executable, "-m", "charrnn", *args], cwd=user, env=env,
                              capture_output=True, text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import charrnn; print(charrnn.__file__)"], cwd=user, env=env,
                           capture_output=True, text=True)
    assert where.stdout.strip() == str(target / "charrnn" / "__init__.py")  # the installed copy ran, not the tree
    r = charrnn("corpus", "list", "--json")
    assert r.returncode == 0, r.stderr
    names = {json.loads(line)["name"] for line in r.stdout.splitlines()}
    assert {"tinyshakespeare", "imdb_train", "sst2_dev"} <= names
    r = charrnn("corpus", "get", "tinyshakespeare", "--mirror", str(SHARED), "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "corpora/tinyshakespeare.txt"
    assert sha256(user / "corpora" / "tinyshakespeare.txt") == sha256(SHARED / "tinyshakespeare.txt")


# ---------------------------------------------------------------- the README demo, offline, from a fresh clone


@pytest.mark.slow
def test_readme_demo_from_a_fresh_clone_with_a_mirror(tmp_path):
    """The demo a new user runs, with CHARRNN_MIRROR standing in for the network.

    The clone is put on PYTHONPATH instead of `pip install -e .`, which would re-point the shared
    environment's install; the commands are otherwise the README's, with a very short training.
    """
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    work = tmp_path / "user"
    work.mkdir()
    env = {**os.environ, "CHARRNN_MIRROR": str(SHARED), "PYTHONPATH": str(clone),
           "CHARRNN_CACHE": str(tmp_path / "cache")}
    script = f"""
set -euo pipefail
charrnn() {{ {sys.executable} -m charrnn "$@"; }}
{sys.executable} -c 'import charrnn; print(charrnn.__file__)' >&2
charrnn corpus get tinyshakespeare
charrnn corpus get tinyshakespeare >&2
charrnn train corpora/tinyshakespeare.txt --steps 5 --hidden 32 --threads 1 -q
charrnn sample --temp 0.8 --length 80 --seed 1
"""
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(clone / "charrnn") in r.stderr  # the clone's code ran, not the working tree's
    out = r.stdout.splitlines()
    assert out[0] == "corpora/tinyshakespeare.txt"
    assert sha256(work / out[0]) == sha256(SHARED / "tinyshakespeare.txt")
    assert "already here" in r.stderr  # the second get did not download again
    assert len("\n".join(out[1:])) >= 80  # the sample
    assert list((work / "checkpoints").iterdir())
    shutil.rmtree(clone)


class EndlessHandler(QuietHandler):
    """Sends the file, then more and more bytes with no Content-Length: a source that never stops."""

    sent = 0

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.end_headers()
        try:
            self.wfile.write(data)
            for _ in range(10_000):  # 640 MB at most, should the client never stop reading
                self.wfile.write(b"x" * 65536)
                EndlessHandler.sent += 65536
        except OSError:
            pass  # the client hung up: what it should do
        self.close_connection = True


class TrickleHandler(QuietHandler):
    """Announces the file, then sends 200 bytes every 50 ms: each read succeeds, the whole takes minutes."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            for i in range(0, len(data), 200):
                self.wfile.write(data[i : i + 200])
                self.wfile.flush()
                threading.Event().wait(0.05)
        except OSError:
            pass
        self.close_connection = True


def test_a_source_sending_more_than_the_catalogued_size_is_cut_off(tmp_path, catalog):
    entry = catalog.entries[SMALL]
    with serve(SHARED, EndlessHandler) as url:
        with pytest.raises(corpora.DownloadError, match="sent more than the catalogue's 61,331 bytes"):
            corpora.fetch(entry, tmp_path / "corpora", url)
    assert EndlessHandler.sent < 1000 * 65536  # stopped after a chunk (the socket buffers took some more), not 640 MB
    assert leftovers(tmp_path / "corpora") == []
    big = tmp_path / "bigmirror"  # a folder (or a server announcing its length) fails before reading
    big.mkdir()
    (big / SMALL_FILE).write_bytes((SHARED / SMALL_FILE).read_bytes() + b"more")
    r = run_cli("corpus", "get", SMALL, "--mirror", big)
    assert "is 61,335 bytes, the catalogue says 61,331" in the_error(r) and r.exit_code == 1


def test_a_download_has_an_overall_deadline(tmp_path, catalog):
    import time

    entry = catalog.entries[SMALL]
    t0 = time.monotonic()
    with serve(SHARED, TrickleHandler) as url:
        with pytest.raises(corpora.DownloadError, match="too slow: .* after 1 s, its deadline"):
            corpora.fetch(entry, tmp_path / "corpora", url, deadline_s=1.0)
    assert time.monotonic() - t0 < 20  # the whole file would take 15 s at this rate; it stopped at 1
    assert leftovers(tmp_path / "corpora") == []
    assert corpora.deadline_for(entry) >= 60  # the default leaves room for a slow line
