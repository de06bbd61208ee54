"""The FastAPI app of `charrnn serve`: the routes, the limits, and every error as 4xx JSON with one message.

Requests are checked by the library's own checks (charrnn.sample.validate, the steering hook's), so a
request is refused for exactly the reasons `charrnn sample` refuses an option; their messages name
CLI flags, and `said_as` rewrites those to the request's field names. Generation goes through one
Batcher per model (batcher.py); loss and trace run in the thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from charrnn.errors import CharRNNError, UsageError
from charrnn.serve.batcher import Batcher, Job, Slots
from charrnn.serve.models import UnknownModel, describe, lookup

WEB = Path(__file__).resolve().parent.parent / "web"  # the page: plain HTML, CSS and JS, no build step


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the `serve` flags of the same names)."""

    max_length: int = 2000  # characters generated per sample
    max_num: int = 8  # samples per request
    max_prime: int = 4000  # characters of prime (or of the text to trace or score)
    max_streams: int = 64  # samples being generated at once, over all requests and models


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# the CLI flags the library's messages name -> the request fields they are here
API_FIELDS = {"temp": "temperature", "top-k": "top_k", "top-p": "top_p", "length": "length", "num": "num",
              "seed": "seed", "guidance": "guidance", "stop": "stop", "sentiment": "sentiment", "neuron": "neuron",
              "value": "value", "state": "state", "prime": "prime"}
OPENAI_FIELDS = {**API_FIELDS, "length": "max_tokens", "num": "n", "prime": "prompt"}


def said_as(message: str, fields: dict[str, str]) -> str:
    return re.sub(r"--([a-z][a-z-]*)", lambda m: fields.get(m.group(1), m.group(0)), message)


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind}}


# ---------------------------------------------------------------- requests


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None  # a served model's name; default: the first served
    prime: str = ""
    length: int = 500
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    num: int = 1
    stop: Union[str, list[str], None] = None
    stop_keep: bool = False
    sentiment: Optional[Literal["positive", "negative", "none"]] = None
    guidance: Optional[float] = None  # default: sample.default_guidance (as `charrnn sample`)
    neuron: Optional[int] = None
    value: Optional[float] = None
    state: Optional[Literal["c", "h", "c+h"]] = None
    words: Literal["known", "any"] = "known"  # as `charrnn sample --words`
    stream: bool = True
    format: Literal["ndjson", "sse"] = "ndjson"


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    text: str
    unit: Optional[int] = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server does not use

    model: Optional[str] = None
    prompt: Union[str, list[str]] = ""
    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    echo: bool = False
    words: Literal["known", "any"] = "known"  # charrnn's own: as `charrnn sample --words`


# ---------------------------------------------------------------- the app


class Server:
    """The served models, their step loops, and the server-wide stream slots."""

    def __init__(self, models: dict[str, Any], limits: Limits):
        self.models, self.limits = models, limits
        self.batchers = {name: Batcher(name, m) for name, m in models.items()}
        self.slots = Slots(limits.max_streams)

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()

    def model(self, name: str | None):
        try:
            return lookup(self.models, name)
        except UnknownModel as e:
            raise ApiError(404, str(e)) from None
        except UsageError as e:
            raise ApiError(400, str(e)) from None

    def check_text(self, name: str, model, text: str) -> None:
        """A text to trace or score: at most what one request could have made (a prime and its sample)."""
        most = self.limits.max_prime + self.limits.max_length
        if len(text) > most:
            raise ApiError(400, f"text is {len(text)} characters; this server takes at most {most} "
                                "(serve --max-prime plus --max-length)")
        check_chars(name, model, text, "text")

    @staticmethod
    def check_length(limits: Limits, text: str, what: str) -> None:
        if len(text) > limits.max_prime:
            raise ApiError(400, f"{what} is {len(text)} characters; this server takes at most {limits.max_prime} "
                                "(serve --max-prime)")

    def job(self, name: str, model, cfg, hook, fields: dict[str, str]):
        """A Job for the (checked) request, with its queue of events; 400 over the limits, 429 when the slots are full."""
        for what, got, most, flag in (("length", cfg.length, self.limits.max_length, "max-length"),
                                      ("num", cfg.num, self.limits.max_num, "max-num")):
            if got > most:
                raise ApiError(400, f"{fields.get(what, what)} is {got}; this server allows at most {most} (serve --{flag})")
        if not self.slots.take(cfg.num):
            raise ApiError(429, f"the server is generating {self.slots.in_use} samples already, its limit is "
                                f"{self.limits.max_streams} (serve --max-streams); try again when one has finished")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(cfg, hook, loop, events, lambda n=cfg.num: self.slots.give(n))
        self.batchers[name].submit(job)
        return job, events


def check_chars(name: str, model, text: str, what: str) -> None:
    """400 for characters the model never saw (`charrnn sample` drops them with a warning; a request is told)."""
    from charrnn.data import Vocab
    from charrnn.sample import clean_prime

    _, unknown = clean_prime(text, Vocab(model.vocab))
    if unknown:
        raise ApiError(400, f"{what} has {len(unknown)} character(s) model {name!r} never saw ({unknown[:20]!r}); remove them")


def sampling(limits: Limits, name: str, model, req: GenerateRequest | CompletionRequest, prime: str, length: int, num: int, fields: dict):
    """(SampleConfig, steering hook) for a request, checked as `charrnn sample` checks its options."""
    from charrnn.config import check_finite
    from charrnn.neuron.steer import steering_hook
    from charrnn.sample import SampleConfig, default_guidance

    Server.check_length(limits, prime, fields["prime"])
    stop = req.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    sentiment = getattr(req, "sentiment", None)
    sentiment = None if sentiment == "none" else sentiment
    neuron, value, state = getattr(req, "neuron", None), getattr(req, "value", None), getattr(req, "state", None)
    guidance = getattr(req, "guidance", None)
    if guidance is None:
        guidance = default_guidance(model.module, model.checkpoint, sentiment)
    check_chars(name, model, prime, fields["prime"])
    if sentiment is not None and model.sentiment is None:
        raise ApiError(400, f"model {name!r} has no sentiment unit; leave out sentiment, or fix a unit with neuron and value")
    try:
        check_finite(value=value)
        cfg = SampleConfig(temperature=req.temperature, top_k=getattr(req, "top_k", 0), top_p=req.top_p,
                           length=length, prime=prime, seed=req.seed, num=num, precision="fp32", guidance=guidance,
                           stop=stops, stop_keep=getattr(req, "stop_keep", False), words=req.words)
        from charrnn.sample import validate

        validate(cfg)
        hook, _ = steering_hook(model.module, model.checkpoint, sentiment, neuron, value, state,
                                guided_rows=num if guidance > 0 else 0)
    except CharRNNError as e:
        raise ApiError(400, said_as(str(e), fields)) from None
    return cfg, hook


def create_app(models: dict[str, Any], limits: Limits = Limits()) -> FastAPI:
    server = Server(models, limits)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(server.close)  # the step loops end with the server

    app = FastAPI(title="charrnn serve", description="Generate, steer, score and trace text with charrnn models "
                  "(docs/serve.md). One token = one character.", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, "rate_limit_error" if e.status == 429 else "invalid_request_error"),
                            status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "the request body"
        msg = err.get("msg", "is not valid")
        if err.get("type") == "extra_forbidden":
            msg = f"this endpoint has no field {where!r}"
        elif err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        else:
            msg = f"{where}: {msg}"
        return JSONResponse(error_body(msg), status_code=400)

    # ------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    # ------------------------------------------------------------ about the models

    @app.get("/api/models")
    async def list_models():
        """The served models: name, cell, size, parameters, validation loss, vocabulary size, sentiment unit."""
        return {"models": [describe(name, m) for name, m in server.models.items()]}

    @app.get("/api/status")
    async def status():
        """Samples being generated (against --max-streams) and each model's step loop."""
        return {"samples": server.slots.in_use, "max_streams": limits.max_streams,
                "models": {name: b.status() for name, b in server.batchers.items()}}

    # ------------------------------------------------------------ text in

    @app.post("/api/loss")
    async def loss(req: TextRequest):
        """The model's loss on a text: nats and bits per character."""
        if req.unit is not None:
            raise ApiError(400, "/api/loss takes no unit; /api/trace reads a unit")
        name, m = server.model(req.model)
        server.check_text(name, m, req.text)
        if len(req.text) < 2:
            raise ApiError(400, "text must be at least 2 characters (the loss scores each character after the first)")
        nats = await run_in_threadpool(_text_call, m.loss, req.text)
        return {"model": name, "chars": len(req.text), "nats_per_char": nats, "bits_per_char": nats / math.log(2)}

    @app.post("/api/trace")
    async def trace(req: TextRequest):
        """A unit's value after each character (default: the model's sentiment unit), with neuron show's colours."""
        from charrnn.render import color_range, unit_colors

        name, m = server.model(req.model)
        server.check_text(name, m, req.text)
        if req.unit is not None and not 0 <= req.unit < m.config["hidden"]:
            raise ApiError(400, f"unit {req.unit} is out of range; this model has {m.config['hidden']} units per layer")
        if req.unit is None and m.sentiment is None:
            raise ApiError(400, f"model {name!r} has no sentiment unit; give unit (0 to {m.config['hidden'] - 1})")
        values = await run_in_threadpool(_text_call, m.trace, req.text, req.unit)
        rec = m.sentiment if req.unit is None else None
        lo, hi = color_range(values, rec) if values else (-1.0, 1.0)
        unit = rec["unit"] if rec else req.unit
        return {"model": name, "unit": unit, "values": values, "lo": lo, "hi": hi,
                "colors": ["#%02x%02x%02x" % c for c in unit_colors(values, lo, hi)]}

    # ------------------------------------------------------------ text out

    @app.post("/api/generate")
    async def generate(req: GenerateRequest):
        """Generate text: streamed as NDJSON lines (or server-sent events with "format": "sse") as the
        characters come, or with "stream": false one JSON object with the whole texts."""
        name, m = server.model(req.model)
        cfg, hook = sampling(limits, name, m, req, req.prime, req.length, req.num, API_FIELDS)
        job, events = server.job(name, m, cfg, hook, API_FIELDS)
        if not req.stream:
            texts = [req.prime] * req.num
            async for kind, data in _events(job, events):
                if kind == "text":
                    texts = [t + d for t, d in zip(texts, data)]
                elif kind == "error":
                    return JSONResponse(error_body(data, "server_error"), status_code=500)
                else:
                    return {"model": name, "texts": texts, "finish_reasons": data}

        def line(obj: dict) -> str:
            text = json.dumps(obj, ensure_ascii=False)
            return f"data: {text}\n\n" if req.format == "sse" else text + "\n"

        async def body():
            async for kind, data in _guarded(job, _events(job, events)):
                if kind == "text":
                    for i, piece in enumerate(data):
                        if piece:
                            yield line({"index": i, "text": piece})
                elif kind == "error":
                    yield line(error_body(data, "server_error"))
                else:
                    yield line({"done": True, "finish_reasons": data})

        media = "text/event-stream" if req.format == "sse" else "application/x-ndjson"
        return StreamingResponse(body(), media_type=media)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        """OpenAI-style completions (one token = one character), as llama.cpp's server, vLLM and Ollama speak them."""
        name, m = server.model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"prompt must be one text (got a list of {len(prompts)}); send one request per prompt")
        prompt = prompts[0]
        length = 16 if req.max_tokens is None else req.max_tokens
        cfg, hook = sampling(limits, name, m, req, prompt, length, req.n, OPENAI_FIELDS)
        job, events = server.job(name, m, cfg, hook, OPENAI_FIELDS)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name}

        def choice(i: int, text: str, reason: str | None) -> dict:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": reason}

        if not req.stream:
            texts = [prompt if req.echo else ""] * req.n
            async for kind, data in _events(job, events):
                if kind == "text":
                    texts = [t + d for t, d in zip(texts, data)]
                elif kind == "error":
                    return JSONResponse(error_body(data, "server_error"), status_code=500)
                else:
                    made = sum(len(t) for t in texts) - (len(prompt) * req.n if req.echo else 0)
                    return {**head, "choices": [choice(i, t, r) for i, (t, r) in enumerate(zip(texts, data))],
                            "usage": {"prompt_tokens": len(prompt), "completion_tokens": made,
                                      "total_tokens": len(prompt) + made}}

        def sse(obj) -> str:
            return "data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n\n"

        async def body():
            async for chunk in _guarded(job, openai_chunks()):
                yield chunk

        async def openai_chunks():
            if req.echo:
                yield sse({**head, "choices": [choice(i, prompt, None) for i in range(req.n)]})
            async for kind, data in _events(job, events):
                if kind == "text":
                    pieces = [choice(i, p, None) for i, p in enumerate(data) if p]
                    yield sse({**head, "choices": pieces})
                elif kind == "error":
                    yield sse(error_body(data, "server_error"))
                else:
                    yield sse({**head, "choices": [choice(i, "", r) for i, r in enumerate(data)]})
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


async def _guarded(job: Job, chunks):
    """The chunks of a streamed response; when the response stops early (the client went away, and the
    server closes this generator) the job is cancelled at once and leaves the step loop at its next step."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        job.cancel()
        await chunks.aclose()


async def _events(job: Job, events: asyncio.Queue):
    """The job's events until its last; if the consumer stops early (the client went away), the job is cancelled."""
    try:
        held = None
        while True:
            kind, data = held or await events.get()
            held = None
            while kind == "text" and not events.empty():  # the client reads slower than the loop writes:
                nxt = events.get_nowait()  # what has piled up goes out as one piece per sample
                if nxt[0] != "text":
                    held = nxt
                    break
                data = [a + b for a, b in zip(data, nxt[1])]
            yield kind, data
            if kind != "text":
                return
    finally:
        job.cancel()


def _text_call(fn, *args):
    """A Model call on a request's text, its errors as 400 (run in the thread pool)."""
    try:
        return fn(*args)
    except CharRNNError as e:
        raise ApiError(400, str(e)) from None
