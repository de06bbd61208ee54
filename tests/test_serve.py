"""charrnn serve: a real server on a loopback port (uvicorn in a thread), real HTTP requests, the official
OpenAI client, and the bad-input table of docs/serve.md run row by row."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="charrnn serve's tests need the serve extra: pip install -e '.[test]'")
import httpx  # noqa: E402

import charrnn  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LONG = 100_000  # the test server's --max-length: a stream this long runs until its client leaves


class Running:
    """uvicorn serving `app` on a free loopback port, in a thread; stop() ends it."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # waits on the server's own flag, up to a generous bound
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def with_unit(run: Path, out: Path) -> Path:
    """A copy of the run's best checkpoint with a sentiment unit record (unit 3, as tests/test_api.py writes one)."""
    from charrnn import checkpoint as ckm

    ck = dict(charrnn.load(run).checkpoint)
    ck.pop("path")
    ck["sentiment"] = {"unit": 3, "layer": 0, "state": "c", "fix_values": {"positive": 2.0, "negative": -2.0}}
    ckm.save(out, ck)
    return out


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """A server over two models: 'run' (no unit) and 'steered' (with a unit); 4 stream slots."""
    from charrnn.serve.app import Limits, create_app
    from charrnn.serve.models import load_models

    steered = with_unit(tiny_run, tmp_path_factory.mktemp("steered") / "steered.safetensors")
    models = load_models([tiny_run, steered])
    s = Running(create_app(models, Limits(max_length=LONG, max_num=4, max_prime=20, max_streams=4)))
    yield s
    s.stop()


def post(served, path, body, **kw):
    return httpx.post(served.url + path, json=body, timeout=60, **kw)


def status(served) -> dict:
    return httpx.get(served.url + "/api/status", timeout=10).json()


def wait_for(cond, what: str, timeout: float = 30):
    """Poll a condition on the server (its status counters) until it holds; fail after a generous bound."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------- the API


def test_models_lists_each_served_run_by_name(served):
    r = httpx.get(served.url + "/api/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {"run", "steered"}
    m = models["run"]
    assert m["cell"] == "lstm" and m["size"] == "1x32" and m["params"] > 0 and m["vocab_size"] > 10
    assert m["val_loss"] > 0 and m["sentiment_unit"] is False and models["steered"]["sentiment_unit"] is True


def test_generate_gives_the_text_sample_gives_for_the_same_seed(served, tiny_run):
    """Unbatched and seeded, a request's text is `charrnn sample --seed`'s, both streamed and whole."""
    body = {"model": "run", "prime": "The", "length": 60, "temperature": 0.8, "seed": 3}
    whole = post(served, "/api/generate", {**body, "stream": False}).json()
    r = run_cli("sample", tiny_run, "--prime", "The", "--length", "60", "--seed", "3", "--temp", "0.8")
    assert whole["texts"] == [r.stdout.removesuffix("\n")] and whole["finish_reasons"] == ["length"]
    lines = [json.loads(x) for x in post(served, "/api/generate", body).text.splitlines()]
    assert lines[-1] == {"done": True, "finish_reasons": ["length"]}
    assert "The" + "".join(x["text"] for x in lines[:-1]) == whole["texts"][0]
    # text lines as the characters come, then the done line; how many depends on the reader's pace (what
    # piles up while the client reads goes out as one piece), so only their order and content are asserted
    assert len(lines) >= 2 and all(x["text"] for x in lines[:-1])


def test_sse_stop_strings_num_and_steering(served):
    r = post(served, "/api/generate", {"model": "run", "prime": "The", "length": 200, "seed": 1, "stop": "\n",
                                       "num": 2, "format": "sse"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(x[len("data: "):]) for x in r.text.split("\n\n") if x]
    assert events[-1] == {"done": True, "finish_reasons": ["stop", "stop"]}
    texts = ["".join(e["text"] for e in events[:-1] if e["index"] == i) for i in (0, 1)]
    assert all(t and "\n" not in t for t in texts)
    want = charrnn.load(served_models_path(served, "steered")).generate("The", length=80, seed=1, sentiment="positive",
                                                                        precision="fp32")  # as the server samples
    got = post(served, "/api/generate", {"model": "steered", "prime": "The", "length": 80, "seed": 1,
                                         "sentiment": "positive", "stream": False}).json()["texts"]
    assert got == want


def test_words_known_spells_the_corpus_words_in_batched_requests_and_any_spells_freely(served):
    """Unseeded requests at once share the step loop and one draw; each still spells only the model's words."""
    from charrnn.lexicon import words

    known = set(charrnn.load(served_models_path(served, "run")).lexicon.words)
    results = {}

    def ask(i, kind):
        body = {"model": "run", "length": 300, "temperature": 1.5, "words": kind, "stream": False}
        r = post(served, "/api/generate", body)
        results[i] = (kind, r.json()["texts"] if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=ask, args=(i, "known" if i < 2 else "any")) for i in range(4)]  # 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind, texts in results.values():
        assert isinstance(texts, list), texts
        spelt = {w for t in texts for w in words(t)[:-1]}  # the last word may be cut by the length
        assert (spelt <= known) == (kind == "known"), (kind, spelt - known)


def served_models_path(served, name: str) -> Path:
    return served.server.config.app.state.server.models[name].path


def test_trace_and_loss_are_the_models(served):
    text = "The king weeps.\n"
    m = charrnn.load(served_models_path(served, "steered"))
    t = post(served, "/api/trace", {"model": "steered", "text": text}).json()
    assert t["values"] == pytest.approx(m.trace(text)) and t["unit"] == 3 and len(t["colors"]) == len(text)
    assert (t["lo"], t["hi"]) == (-2.0, 2.0) and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in t["colors"])
    u = post(served, "/api/trace", {"model": "run", "text": text, "unit": 5}).json()
    assert u["values"] == pytest.approx(m.trace(text, unit=5))
    long = post(served, "/api/trace", {"model": "run", "text": "a" * (20 + LONG + 1), "unit": 1})
    assert long.status_code == 400 and long.json()["error"]["message"] == (
        f"text is {20 + LONG + 1} characters; this server takes at most {20 + LONG} (serve --max-prime plus --max-length)")
    loss = post(served, "/api/loss", {"model": "run", "text": text}).json()
    assert loss["nats_per_char"] == pytest.approx(m.loss(text)) and loss["bits_per_char"] > loss["nats_per_char"]


# ---------------------------------------------------------------- continuous batching


def test_concurrent_streams_share_one_step_and_a_client_that_leaves_frees_its_slots(served):
    """A long stream holds slots; requests made meanwhile (one plain, one steered with guidance) join it in
    the same batched steps, each fixing only its own rows, and get the text they get alone; a request
    past the slots is refused (429); when the long stream's client disconnects its samples leave the
    loop (the status counter falls to 0) and the server serves on."""
    plain = {"model": "steered", "prime": "A", "length": 50, "seed": 7, "stream": False}
    steered = {**plain, "sentiment": "negative", "seed": 8}
    alone = [post(served, "/api/generate", body).json()["texts"] for body in (plain, steered)]
    assert status(served)["models"]["steered"]["most_streams_in_one_step"] <= 1  # every request so far ran alone
    with httpx.stream("POST", served.url + "/api/generate", timeout=60,
                      json={"model": "steered", "prime": "The", "length": LONG, "num": 2}) as long:
        lines = long.iter_lines()
        assert json.loads(next(lines))["text"]  # the long stream is generating
        assert status(served)["samples"] == 2
        together = [post(served, "/api/generate", body).json()["texts"] for body in (plain, steered)]
        full = post(served, "/api/generate", {"model": "run", "num": 3, "length": 5})
        assert full.status_code == 429 and "limit is 4" in full.json()["error"]["message"]
        assert status(served)["models"]["steered"]["most_streams_in_one_step"] >= 2
        for _ in range(5):
            next(lines)
    # the with-block closed the connection mid-stream
    wait_for(lambda: status(served)["samples"] == 0, "the disconnected stream to leave")
    assert status(served)["models"]["steered"]["streams"] == 0
    assert together == alone
    assert post(served, "/api/generate", {"model": "run", "length": 5, "stream": False}).status_code == 200


# ---------------------------------------------------------------- OpenAI's client


def test_the_official_openai_client_completes_and_streams(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="not-needed")
    ref = charrnn.load(served_models_path(served, "run")).generate("The", length=40, seed=5, temperature=1.0,
                                                                   precision="fp32")[0]  # the server's precision
    c = client.completions.create(model="run", prompt="The", max_tokens=40, seed=5)
    assert c.choices[0].text == ref[len("The"):] and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 40 and c.usage.prompt_tokens == 3
    chunks = client.completions.create(model="run", prompt="The", max_tokens=40, seed=5, stream=True)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref[len("The"):]
    two = client.completions.create(model="run", prompt="The", max_tokens=200, n=2, stop=["\n"], temperature=0.5)
    assert [ch.finish_reason for ch in two.choices] == ["stop", "stop"]
    with pytest.raises(openai.BadRequestError, match="temperature must be 0"):
        client.completions.create(model="run", prompt="The", max_tokens=5, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="no served model is named 'gpt-4'"):
        client.completions.create(model="gpt-4", prompt="The", max_tokens=5)


# ---------------------------------------------------------------- bad input (the table in docs/serve.md)


def bad_input_rows() -> list[tuple[str, str, int, str]]:
    """(endpoint, body, status, message) of each row of docs/serve.md's bad-input table."""
    rows = []
    for line in (REPO / "docs" / "serve.md").read_text().splitlines():
        m = re.match(r"\| `(POST|GET) (/\S+)` \| `(.*)` \| (\d{3}) \| (.*) \|$", line)
        if m:
            rows.append((m.group(2), m.group(3), int(m.group(4)), m.group(5).replace("\\|", "|")))
    return rows


def test_the_docs_bad_input_table_has_every_case():
    assert len(bad_input_rows()) >= 20


@pytest.mark.parametrize("endpoint,body,code,message", bad_input_rows())
def test_bad_input_is_4xx_json_with_one_message_and_the_server_serves_on(served, endpoint, body, code, message):
    r = httpx.post(served.url + endpoint, content=body.encode(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == code, r.text
    err = r.json()["error"]["message"]
    assert err == message
    assert "\n" not in err and "Traceback" not in r.text
    ok = post(served, "/api/generate", {"model": "run", "length": 3, "stream": False})
    assert ok.status_code == 200


# ---------------------------------------------------------------- the command


def test_serve_without_the_extra_says_how_to_get_it(monkeypatch, tiny_run):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if uvicorn were not installed
    r = run_cli("serve", tiny_run, "--port", "0")
    assert r.exit_code == 1 and r.stderr.strip() == 'error: charrnn serve needs FastAPI and uvicorn: pip install "charrnn[serve]"'


def test_serve_with_no_runs_and_two_runs_of_one_name_are_one_line_errors(tmp_path, tiny_run):
    r = run_cli("serve", "--port", "0")
    assert r.exit_code == 1 and "no runs with checkpoints under" in r.stderr and len(r.stderr.splitlines()) == 1
    with_unit(tiny_run, tmp_path / "run.safetensors")
    r = run_cli("serve", tiny_run, tmp_path / "run.safetensors", "--port", "0")
    assert r.exit_code == 2 and "two runs are named 'run'" in r.stderr


def test_the_command_serves_a_run_until_stopped(tiny_run, tmp_path):
    """`charrnn serve RUN --port P` as a user starts it: it serves the run by its folder name."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", str(tiny_run), "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        said = proc.stderr.readline()  # printed once the models are loaded and the port is bound
        m = re.fullmatch(r"serving run at (http://127\.0\.0\.1:(\d+))/ \(API docs at /docs; Ctrl-C stops\)\n", said)
        assert m, said
        url, port = m.group(1), m.group(2)
        taken = run_cli("serve", tiny_run, "--port", port)  # the port is the running server's
        assert taken.exit_code == 1 and taken.stderr.startswith(f"error: cannot listen on 127.0.0.1 port {port}")
        assert len(taken.stderr.splitlines()) == 1
        def up():
            try:
                return httpx.get(url + "/api/models", timeout=5).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, "the server to answer")
        assert [m["name"] for m in httpx.get(url + "/api/models").json()["models"]] == ["run"]
        assert httpx.get(url + "/").text.startswith("<!DOCTYPE html>")
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -15)


def test_the_page_fetches_nothing_but_this_server():
    """Plain files, no build step, no network: every URL in the page is this server's own path."""
    web = REPO / "charrnn" / "web"
    assert {p.name for p in web.iterdir()} == {"index.html", "app.js", "style.css"}
    for p in web.iterdir():
        text = p.read_text()
        assert not re.search(r"https?://|//cdn|@import", text), p
        for url in re.findall(r'(?:src|href)="([^"]+)"', text) + re.findall(r'fetch\("([^"]+)"', text):
            assert url.startswith("/"), (p, url)
