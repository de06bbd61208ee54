"""Continuous batching: one step loop per model, in a thread of its own, that advances every active stream together.

A generation request becomes a Job: its samples' rows (num, or 2 * num with guidance), their state,
their seeded generator, stop strings and steering hook. The loop feeds a newly joined job's prime
(one character at a time, as `charrnn sample` does), then at every step draws each job's next
characters with charrnn.sample.draw (the same filters, guidance and seeds as `sample`) and runs ONE
model.step over the rows of all jobs together, each job's hook fixing only its own rows. A job that
finished, or whose client went away (`cancel()`), leaves before the next step and frees its slot.

The loop never runs on the event loop: after each step it hands that step's text of every job to the
event loop in one call_soon_threadsafe (each job's asyncio.Queue gets its own).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from charrnn.data import Vocab
from charrnn.errors import CharRNNError
from charrnn.sample import SampleConfig, default_prime, draw, seeded_generator, speller_for
from charrnn.stops import StopStrings

# a job's events: ("text", [new text of each sample]), ("end", [finish reason of each sample])
# or ("error", one-line message); "end" and "error" are the last event of a job
Event = tuple


class Slots:
    """The server-wide count of samples being generated, against --max-streams (thread-safe)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.in_use + n > self.limit:
                return False
            self.in_use += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.in_use -= n


class Job:
    """One request's samples, stepping with every other job of its model."""

    def __init__(self, cfg: SampleConfig, hook, loop, events, release: Callable[[], None]):
        self.cfg, self.hook = cfg, hook
        self.loop, self.events = loop, events  # the requester's event loop and its asyncio.Queue of Events
        self.outbox: list[Event] = []  # this step's events, handed to the event loop together (Batcher._send)
        self.n = cfg.num
        self.rows = 2 * self.n if cfg.guidance > 0 else self.n
        self.gen = seeded_generator(cfg.seed)
        self.stops = StopStrings(cfg.stop, self.n, cfg.stop_keep) if cfg.stop else None
        self.done = 0  # characters drawn per sample
        self.state = self.logits = self.feed = None
        self.speller = None  # with words "known": where each sample stands in the model's lexicon (charrnn/lexicon.py)
        self.cancelled = False  # set by the server's thread when the client goes away; read by the loop
        self._release = release
        self._over = False

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, event: Event) -> None:
        """The job's last event, and its slot back: exactly once."""
        if self._over:
            return
        self._over = True
        self._release()
        self.post(event)

    def post(self, event: Event) -> None:
        if not self.cancelled:
            self.outbox.append(event)

    def reasons(self) -> list[str]:
        stopped = self.stops.stopped if self.stops else [False] * self.n
        return ["stop" if s else "length" for s in stopped]


def batch_hook(jobs: list[Job]):
    """One hook over the rows of all jobs: each job's own hook edits its own rows, the others pass."""
    hooks = [j.hook for j in jobs]
    if not any(h is not None for h in hooks):
        return None
    if len(jobs) == 1:
        return hooks[0]  # exactly what `charrnn sample` runs
    sizes = [j.rows for j in jobs]

    def hook(layer: int, t: int, state):
        parts = [s.split(sizes) for s in state]  # per state part: one slice per job
        out = []
        for k, h in enumerate(hooks):
            mine = tuple(p[k] for p in parts)
            out.append(mine if h is None else h(layer, t, mine))
        return tuple(torch.cat([o[i] for o in out]) for i in range(len(state)))

    return hook


class Batcher:
    """The step loop of one model: jobs join through `submit`, leave when done or cancelled."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model  # a charrnn.Model
        self.module = model.module
        self.device = self.module.head.weight.device
        self.chars = model.vocab
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab = Vocab(self.chars)
        self.default_prime = default_prime(self.vocab)
        self.active: list[Job] = []
        self.steps = 0  # batched model steps run
        self.most_jobs = 0  # the most jobs one step has advanced together
        self._waiting: queue.Queue = queue.Queue()
        self._done: list[Job] = []  # jobs with events to send after this step
        self.gen = seeded_generator(None)  # the draws of unseeded jobs drawn together
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"charrnn-serve-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._waiting.put(job)

    def close(self) -> None:
        self._closed = True
        self._waiting.put(None)
        self._thread.join(timeout=10)

    def status(self) -> dict:
        jobs = list(self.active)
        return {"streams": len(jobs), "samples": sum(j.n for j in jobs), "steps": self.steps,
                "most_streams_in_one_step": self.most_jobs}

    # ------------------------------------------------------------ the loop (its own thread)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread: no autograd graph behind any step
        while not self._closed:
            self._admit(block=not self.active)
            for job in [j for j in self.active if j.cancelled]:
                self._leave(job, ("end", job.reasons()))
            self._draw_all()
            self._send()
            if self.active:
                try:
                    self._step()
                except Exception as e:  # a step that fails ends its jobs, never the loop: the server keeps serving
                    for job in list(self.active):
                        self._leave(job, ("error", f"generation failed: {type(e).__name__}: {e}"))
                    self._send()
        for job in list(self.active):
            self._leave(job, ("error", "the server is shutting down"))
        self._send()

    def _admit(self, block: bool) -> None:
        """Take every waiting job (waiting for one when nothing is active) and feed each its prime."""
        try:
            job = self._waiting.get(block=block)
            while True:
                if job is None:
                    return  # close()
                self._join(job)
                job = self._waiting.get_nowait()
        except queue.Empty:
            return

    def _join(self, job: Job) -> None:
        self._done.append(job)  # whatever happens here, its events go out with this step's
        if job.cancelled:
            job.finish(("end", job.reasons()))
            return
        try:
            state = self.module.init_state(job.rows, self.device)
            logits = None
            job.speller = speller_for(job.cfg, self.model.lexicon, self.vocab, job.n)
            for ch in job.cfg.prime or self.default_prime:  # one character at a time, as `sample` feeds it
                x = torch.full((job.rows,), self.stoi[ch], dtype=torch.long, device=self.device)
                logits, state = self.module.step(x, state, job.hook)
                if job.speller is not None:
                    job.speller.feed(x[: job.n])
        except Exception as e:
            job.finish(("error", f"generation failed: {type(e).__name__}: {e}"))
            return
        job.logits, job.state = logits, state
        if job.cfg.length == 0:
            job.finish(("end", job.reasons()))
            return
        self.active.append(job)

    def _draw_all(self) -> None:
        """Every active job's next characters. Unseeded, unguided jobs with the same filters are drawn in
        one call from the loop's own generator (their text is random anyway); a seeded job draws from its
        own generator, so its text is the one `charrnn sample --seed` gives."""
        groups: dict[tuple, list[Job]] = {}
        for job in self.active:
            if job.speller is not None:
                job.logits = job.speller.restrict(job.logits)
            if job.cfg.seed is None and job.rows == job.n:
                groups.setdefault((job.cfg.temperature, job.cfg.top_k, job.cfg.top_p), []).append(job)
        shared = {id(j) for g in groups.values() if len(g) > 1 for j in g}
        for g in groups.values():
            if len(g) > 1:
                try:
                    ids = draw(torch.cat([j.logits for j in g]), sum(j.n for j in g), g[0].cfg, self.gen, 0)
                except CharRNNError:
                    shared -= {id(j) for j in g}  # drawn one by one below, so the error names its own job
                    continue
                for j, nxt in zip(g, ids.split([j.n for j in g])):
                    self._advance(j, nxt)
        for job in list(self.active):
            if id(job) not in shared:
                try:
                    nxt = draw(job.logits, job.n, job.cfg, job.gen, job.done)
                except CharRNNError as e:
                    self._leave(job, ("error", str(e)))
                    continue
                self._advance(job, nxt)

    def _advance(self, job: Job, nxt: torch.Tensor) -> None:
        """Hand on the job's next characters; the job leaves when it is done."""
        self._done.append(job)
        job.done += 1
        if job.speller is not None:
            job.speller.feed(nxt)
        chars = [self.chars[j] for j in nxt.tolist()]
        text = job.stops.feed(chars) if job.stops else chars
        ended = job.done >= job.cfg.length or (job.stops is not None and job.stops.all_stopped)
        if ended and job.stops is not None:
            text = [a + b for a, b in zip(text, job.stops.flush())]
        if any(text):
            job.post(("text", text))
        if ended:
            self._leave(job, ("end", job.reasons()))
        else:
            job.feed = nxt.repeat(job.rows // job.n)

    def _step(self) -> None:
        """One model.step over the rows of every active job."""
        jobs = self.active
        x = torch.cat([j.feed for j in jobs]).to(self.device)
        if len(jobs) == 1:
            state = jobs[0].state
        else:
            state = tuple(torch.cat([j.state[i] for j in jobs], 1) for i in range(len(jobs[0].state)))
        logits, state = self.module.step(x, state, batch_hook(jobs))
        sizes = [j.rows for j in jobs]
        for j, lg, *parts in zip(jobs, logits.split(sizes), *(s.split(sizes, 1) for s in state)):
            j.logits, j.state = lg, tuple(parts)
        self.steps += 1
        self.most_jobs = max(self.most_jobs, len(jobs))

    def _leave(self, job: Job, event: Event) -> None:
        if job in self.active:
            self.active.remove(job)
        job.finish(event)
        self._done.append(job)

    def _send(self) -> None:
        """This step's events of every job, in one call per event loop (not one per job and character)."""
        by_loop: dict[int, list[Job]] = {}
        for job in dict.fromkeys(self._done):
            if job.outbox:
                by_loop.setdefault(id(job.loop), []).append(job)
        self._done = []
        for jobs in by_loop.values():
            batch = [(j.events, j.outbox) for j in jobs]
            for j in jobs:
                j.outbox = []
            jobs[0].loop.call_soon_threadsafe(_hand_out, batch)


def _hand_out(batch) -> None:
    """On the event loop: each job's events into its queue."""
    for events, items in batch:
        for item in items:
            events.put_nowait(item)

