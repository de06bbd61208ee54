"""Benchmarks: charrnn against raw PyTorch loops doing the same math, measured side by side in one run.

Every figure is measured here and every ratio is computed from two figures of the same run.
Results are reported through `callback(section, row)`; nothing is printed in this module.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from charrnn.config import WEIGHT_DECAY, TrainConfig
from charrnn.data import Vocab
from charrnn.lexicon import Lexicon
from charrnn.model import CharRNN, ModelConfig
from charrnn.sample import SampleConfig, choose_precision, generate

Report = Callable[[str, dict], None]


def rss_mb() -> float:
    """Current resident memory of this process in MB (Linux; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """Text with a 65-character vocabulary, like tiny Shakespeare's (speed does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    alphabet = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    ids = torch.randint(0, len(alphabet), (n_chars,), generator=g)
    return "".join(alphabet[i] for i in ids.tolist())


# ---------------------------------------------------------------- training throughput


def synthetic_corpus(folder: Path) -> Path:
    """The training sections' corpus: 400,000 characters of synthetic text in `folder`/bench.txt."""
    corpus = folder / "bench.txt"
    corpus.write_text(synthetic_text(400_000))
    return corpus


@dataclass
class Shape:
    cell: str
    layers: int
    hidden: int
    seq_len: int = 100
    batch_size: int = 32

    @property
    def name(self) -> str:
        return f"{self.cell} {self.layers}x{self.hidden} seq {self.seq_len} batch {self.batch_size}"


class RawModel(nn.Module):
    """The baseline: embedding, fused recurrent layers, linear head; nothing else."""

    def __init__(self, vocab: int, s: Shape):
        super().__init__()
        self.emb = nn.Embedding(vocab, s.hidden)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[s.cell](s.hidden, s.hidden, s.layers, batch_first=True)
        self.head = nn.Linear(s.hidden, vocab)

    def forward(self, x, h):
        out, h = self.rnn(self.emb(x), h)
        return self.head(out), h


def raw_train_steps(data: torch.Tensor, vocab: int, s: Shape, device: str = "cpu",
                    precision: str | None = None) -> Iterator[float]:
    """A plain PyTorch TBPTT loop (AdamW, charrnn's default decay, clipping), endless: yields each step's seconds.

    `precision` ("fp32", "bf16" or "fp16") is the autocast of its forward pass, the loss in fp32, as
    charrnn's; None: CUDA's mixed precision on CUDA (bf16, or fp16 where bf16 is missing), fp32 elsewhere."""
    from charrnn.device import AUTOCAST_DTYPES, autocast_dtype

    torch.manual_seed(0)
    dev = torch.device(device)
    amp = autocast_dtype(dev) if precision is None else AUTOCAST_DTYPES[precision]
    m = RawModel(vocab, s).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    n = len(data) // s.batch_size
    streams = data[: n * s.batch_size].view(s.batch_size, n)
    h = None
    for i in itertools.count():
        t0 = time.perf_counter()
        p = (i * s.seq_len) % (n - s.seq_len - 1)
        chunk = streams[:, p : p + s.seq_len + 1].long().to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            logits, h = m(chunk[:, :-1], h)
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), chunk[:, 1:].reshape(-1))
        h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        loss.item()
        yield time.perf_counter() - t0


def raw_train_cps(data: torch.Tensor, vocab: int, s: Shape, steps: int, warmup: int = 3,
                  device: str = "cpu", precision: str | None = None) -> float:
    """chars/s of `raw_train_steps` over `steps` steps after `warmup` untimed ones."""
    loop = raw_train_steps(data, vocab, s, device, precision)
    for _ in range(warmup):
        next(loop)
    return steps * s.batch_size * s.seq_len / sum(next(loop) for _ in range(steps))


def charrnn_train_cps(corpus: Path, s: Shape, steps: int, run_dir: Path, device: str = "cpu",
                      precision: str = "fp32", beside: Callable[[str], Callable[[], None]] | None = None,
                      ) -> tuple[float, list[float], str]:
    """chars/s of charrnn's own training loop (the code `charrnn train` runs) at the same shape, its RSS
    after each logged step, and the precision it trained in (`precision` is train --precision's).

    `beside(precision)`, if given, is called once the run knows its precision and returns a function
    that the run calls after every logged step (every LOG_EVERY steps), outside the time it counts:
    `interleaved_train_cps` runs the raw loop's steps there."""
    from charrnn.events import TrainEvents
    from charrnn.train import Trainer

    rss: list[float] = []

    class Memory(TrainEvents):
        after: Callable[[], None] | None = None  # beside's function, once the run has chosen its precision

        def on_step(self, e) -> None:
            rss.append(rss_mb())
            if self.after is not None:
                self.after()

    cfg = TrainConfig(cell=s.cell, layers=s.layers, hidden=s.hidden, seq_len=s.seq_len, batch_size=s.batch_size,
                      steps=steps, eval_every=10**9, eval_chars=2000, warmup_steps=1, device=device,
                      precision=precision)
    memory = Memory()
    trainer = Trainer.new([corpus], cfg, run_dir=run_dir, callback=memory)
    if beside is not None:
        memory.after = beside(trainer.state.precision)
    summary = trainer.run()
    return summary["chars_per_s"], rss, trainer.state.precision


def interleaved_train_cps(corpus: Path, data: torch.Tensor, vocab: int, s: Shape, steps: int, run_dir: Path,
                          device: str = "cpu", precision: str = "fp32", warmup: int = 3,
                          ) -> tuple[float, float, list[float], str]:
    """charrnn's training loop and the raw loop in the same precision, interleaved: after every
    LOG_EVERY steps of charrnn, as many steps of the raw loop (after `warmup` untimed ones before
    the first). A slow spell of a shared machine then slows both sides alike, where whole runs one
    after the other saw ratios from 0.84 to 1.11 in one sitting (docs/speed.md).
    Returns (charrnn chars/s, raw chars/s, the process's RSS after each logged step from the second on
    (the first comes before the raw loop's first steps have grown its buffers), the precision)."""
    from charrnn.train import LOG_EVERY

    raw_times: list[float] = []  # the run logs at its last step, so all `steps` of them are run by its end

    def beside(used: str) -> Callable[[], None]:
        loop = raw_train_steps(data, vocab, s, device, used)
        for _ in range(warmup):
            next(loop)

        def run_some() -> None:
            for _ in range(min(LOG_EVERY, steps - len(raw_times))):
                raw_times.append(next(loop))
        return run_some

    cps, rss, used = charrnn_train_cps(corpus, s, steps, run_dir, device, precision, beside)
    raw_cps = len(raw_times) * s.batch_size * s.seq_len / sum(raw_times)
    return cps, raw_cps, rss[1:], used


def default_train_precisions(device: str) -> list[str]:
    """What `bench --sections train` compares: fp32, and bf16 where this CPU has it natively; on CUDA,
    charrnn's mixed precision (auto) on both sides."""
    from charrnn.device import cpu_has_bf16

    if device == "cuda":
        return ["auto"]
    return ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]


def bench_training(report: Report, shapes: list[Shape], steps: int, rounds: int = 2, device: str = "cpu",
                   precisions: list[str] | None = None) -> list[dict]:
    """Raw loop and charrnn in each precision, interleaved within each run (`interleaved_train_cps`)
    and the precisions alternated `rounds` times per shape; medians and their ratio.

    Each precision ("fp32", "bf16" or "auto", as train --precision) gets a "train" row: charrnn against
    a raw loop in the same precision. With fp32 and bf16 both asked, a "precision" row per shape gives
    bf16's speed over fp32's, for charrnn and for the raw loop; where charrnn refuses bf16 (a CPU
    without native bf16) that row says why and what the raw loop did in bf16 (its speed, or its error).
    """
    from charrnn.errors import CharRNNError

    precisions = precisions or default_train_precisions(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp))
        data = torch.tensor(Vocab.from_text_chars(corpus.read_text()).encode(corpus.read_text()), dtype=torch.uint8)
        vocab = int(data.max()) + 1
        for s in shapes:
            raw = {p: [] for p in precisions}
            ours, growth, used, refused = {p: [] for p in precisions}, {p: [] for p in precisions}, {}, {}
            for r in range(rounds):
                for p in precisions:  # alternated: a slow spell of the machine hits every side alike
                    if p in refused:
                        continue
                    try:
                        cps, raw_cps, rss, used[p] = interleaved_train_cps(
                            corpus, data, vocab, s, steps, Path(tmp) / f"run-{s.cell}{s.hidden}-{p}-{r}", device, p)
                    except CharRNNError as e:
                        refused[p] = str(e)
                        continue
                    ours[p].append(cps)
                    raw[p].append(raw_cps)
                    if len(rss) >= 2:
                        growth[p].append(rss[-1] - rss[0])
            for p in precisions:
                if p in refused:
                    continue
                row = {"shape": s.name, "device": device, "precision": used[p],
                       "raw_chars_per_s": statistics.median(raw[p]), "charrnn_chars_per_s": statistics.median(ours[p]),
                       "rss_growth_mb": max(growth[p]) if growth[p] else 0.0}
                row["ratio"] = row["charrnn_chars_per_s"] / row["raw_chars_per_s"]
                report("train", row)
                rows.append(row)
            if {"fp32", "bf16"} <= set(precisions):
                rows.append(_bf16_row(report, s, device, raw, ours, refused.get("bf16"), data, vocab, steps))
    return rows


def bench_cells(report: Report, hidden: int, steps: int, rounds: int = 3, seq_len: int = 100,
                batch_size: int = 32) -> dict:
    """The mLSTM's training speed against the fused LSTM's at the same width (one layer), both through
    charrnn's own training loop in fp32, alternated `rounds` times; medians and their ratio."""
    speeds: dict[str, list[float]] = {"lstm": [], "mlstm": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp))
        for r in range(rounds):
            for cell in speeds:
                s = Shape(cell, 1, hidden, seq_len, batch_size)
                speeds[cell].append(charrnn_train_cps(corpus, s, steps, Path(tmp) / f"run-{cell}-{r}")[0])
    lstm, mlstm = statistics.median(speeds["lstm"]), statistics.median(speeds["mlstm"])
    row = {"shape": f"1x{hidden} seq {seq_len} batch {batch_size}", "threads": torch.get_num_threads(),
           "lstm_chars_per_s": lstm, "mlstm_chars_per_s": mlstm, "ratio": mlstm / lstm,
           "load_average": os.getloadavg()[0]}
    report("cells", row)
    return row


def _bf16_row(report: Report, s: Shape, device: str, raw: dict, ours: dict, refused: str | None,
              data: torch.Tensor, vocab: int, steps: int) -> dict:
    """bf16 over fp32, charrnn's and the raw loop's; or why charrnn refused bf16 and what the raw loop did."""
    fp32, raw_fp32 = statistics.median(ours["fp32"]), statistics.median(raw["fp32"])
    row = {"shape": s.name, "device": device, "charrnn_fp32_chars_per_s": fp32, "raw_fp32_chars_per_s": raw_fp32}
    if refused is None:
        bf16, raw_bf16 = statistics.median(ours["bf16"]), statistics.median(raw["bf16"])
        row.update(charrnn_bf16_chars_per_s=bf16, raw_bf16_chars_per_s=raw_bf16, speedup=bf16 / fp32,
                   raw_speedup=raw_bf16 / raw_fp32, refused=None, raw_error=None)
    else:  # what bf16 does here without charrnn's refusal: the raw loop, emulated, or its kernel's error
        try:
            raw_bf16 = raw_train_cps(data, vocab, s, steps, device=device, precision="bf16")
            row.update(raw_bf16_chars_per_s=raw_bf16, raw_speedup=raw_bf16 / raw_fp32, raw_error=None)
        except RuntimeError as e:
            row.update(raw_bf16_chars_per_s=None, raw_speedup=None, raw_error=str(e).splitlines()[0].split(". ")[0][:120])
        row.update(charrnn_bf16_chars_per_s=None, speedup=None, refused=refused)
    report("precision", row)
    return row


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def raw_sample_cps(model: CharRNN, length: int, temperature: float = 0.8, dtype: torch.dtype = torch.float32) -> float:
    """A plain loop of stacked nn.LSTMCell steps, softmax and multinomial, one stream, weights in `dtype`."""
    c = model.config
    cells = []
    for layer in range(c.layers):
        cell = nn.LSTMCell(c.embed_dim if layer == 0 else c.hidden, c.hidden)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.rnn, f"{name}_l{layer}"))
        cells.append(cell.to(dtype))
    emb, head = copy.deepcopy(model.embedding).to(dtype), copy.deepcopy(model.head).to(dtype)
    g = torch.Generator().manual_seed(0)
    hs = [(torch.zeros(1, c.hidden, dtype=dtype), torch.zeros(1, c.hidden, dtype=dtype)) for _ in cells]
    x = torch.zeros(1, dtype=torch.long)
    t0 = time.perf_counter()
    out = []
    for _ in range(length):
        inp = emb(x)
        for i, cell in enumerate(cells):
            hs[i] = cell(inp, hs[i])
            inp = hs[i][0]
        probs = torch.softmax(head(inp).float() / temperature, dim=-1)
        x = torch.multinomial(probs, 1, generator=g).view(1)
        out.append(x.item())
    return length / (time.perf_counter() - t0)


def charrnn_sample_cps(model: CharRNN, vocab: Vocab, length: int, num: int = 1, temperature: float = 0.8,
                      precision: str = "auto", lexicon: Lexicon | None = None) -> float:
    """Characters per second of charrnn's sampler, all streams counted (spelling `lexicon`'s words when given)."""
    t0 = time.perf_counter()
    generate(model, vocab, SampleConfig(temperature=temperature, length=length, seed=0, num=num, precision=precision),
             lexicon=lexicon)
    return num * length / (time.perf_counter() - t0)


def synthetic_lexicon(n_words: int, seed: int = 0) -> Lexicon:
    """n distinct random lowercase words of 2 to 9 letters: a word list the size of a real corpus's
    (the speller's cost depends on its tree's size, not on the words)."""
    g = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < n_words:
        found["".join(g.choice(string.ascii_lowercase) for _ in range(g.randint(2, 9)))] = None
    return Lexicon(tuple(found), 3)


def _seconds_to_output(args: list[str], n_bytes: int) -> float:
    """Seconds from starting `python ARGS` to its first `n_bytes` on stdout (not to its exit); then it is killed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(n_bytes)
    seconds = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    return seconds


def first_char_latency(checkpoint: Path) -> float:
    """Seconds from starting `charrnn sample` to the first generated character on its stdout."""
    # 2 bytes: the default prime (a newline) and the first generated character
    return _seconds_to_output(["-m", "charrnn", "sample", str(checkpoint), "--length", "200", "--temp", "0.8"], 2)


def import_torch_s() -> float:
    """Seconds from starting a fresh interpreter to its first output after `import torch`: the floor under the
    first character, timed the same way."""
    return _seconds_to_output(["-c", "import torch; print('x', flush=True)"], 1)


def bench_sampling(report: Report, hidden: int, layers: int, length: int, num: int) -> dict:
    """One stream of charrnn (auto precision, then fp32) against raw fp32 and raw bf16 LSTMCell loops, alternated;
    --num streams against one; the first character of `charrnn sample` on a saved checkpoint."""
    from charrnn import checkpoint as ckm

    torch.manual_seed(0)
    vocab = Vocab.from_text_chars(synthetic_text(5000))
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=layers, hidden=hidden)).eval()
    precision, batched_precision = choose_precision(model, "auto", 1), choose_precision(model, "auto", num)  # measured once, cached
    lexicon = synthetic_lexicon(10_000)
    raws, raws16, ones, fp32s, spelt = [], [], [], [], []
    for _ in range(5):  # alternated, so a slow spell of the machine hits every side alike
        raws.append(raw_sample_cps(model, length))
        raws16.append(raw_sample_cps(model, length, dtype=torch.bfloat16))
        ones.append(charrnn_sample_cps(model, vocab, length))
        fp32s.append(charrnn_sample_cps(model, vocab, length, precision="fp32"))
        spelt.append(charrnn_sample_cps(model, vocab, length, lexicon=lexicon))
    raw, raw16 = statistics.median(raws), statistics.median(raws16)
    one, fp32, known = statistics.median(ones), statistics.median(fp32s), statistics.median(spelt)
    best_raw = max(raw, raw16)
    short = max(length // 4, 50)
    many, many_fp32, one_short = [], [], []
    for _ in range(3):  # --num N against one stream, both in the same stretch of time
        many.append(charrnn_sample_cps(model, vocab, short, num=num))
        one_short.append(charrnn_sample_cps(model, vocab, short))
        many_fp32.append(charrnn_sample_cps(model, vocab, short, num=num, precision="fp32"))
    many, many_fp32, one_short = statistics.median(many), statistics.median(many_fp32), statistics.median(one_short)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ckm.ckpt_name(0)
        ckm.save(path, {"model_config": model.config.to_dict(), "vocab": vocab.chars,
                        "model": model.state_dict(), "train": {"step": 0, "state": {}, "config": {}, "corpus": []},
                        "val_loss": None, "lexicon": lexicon.to_record()})
        pairs = [(first_char_latency(path), import_torch_s()) for _ in range(3)]  # alternated, as above
    latency, floor = (statistics.median(side) for side in zip(*pairs))
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    row = {"model": f"lstm {layers}x{hidden}", "weights_mb": weights_mb, "raw_chars_per_s": raw,
           "raw_bf16_chars_per_s": raw16, "best_raw": "bf16" if raw16 > raw else "fp32",
           "precision": precision, "charrnn_chars_per_s": one, "ratio": one / best_raw,
           "fp32_chars_per_s": fp32, "fp32_ratio": fp32 / raw, "known_words_chars_per_s": known,
           "known_words_ratio": known / one, "num": num,
           "batched_precision": batched_precision, "batched_chars_per_s": many, "one_stream_chars_per_s": one_short,
           "batched_ratio": many / one_short, "batched_fp32_chars_per_s": many_fp32, "batched_fp32_ratio": many_fp32 / fp32,
           "first_char_s": latency, "import_torch_s": floor, "load_average": os.getloadavg()[0]}
    report("sample", row)
    return row


# ---------------------------------------------------------------- start-up


def bench_startup(report: Report, repeats: int = 5) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "charrnn", "--help"], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    row = {"command": "charrnn --help", "seconds": statistics.median(times)}
    report("startup", row)
    return row


# ---------------------------------------------------------------- big corpora


def _run_measured(args: list[str], env: dict, watch: Path) -> dict:
    """Run a command; seconds until `watch` appears, total seconds, and the child's own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if seen is None and watch.exists() and watch.stat().st_size > 0:
            seen = time.perf_counter() - t0
        if pid:
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit_code": proc.returncode, "first_step_s": seen, "total_s": time.perf_counter() - t0,
            "peak_rss_mb": usage.ru_maxrss / 1024, "stderr": proc.stderr.read().decode(errors="replace")[-300:]}


def bench_big_corpus(report: Report, megabytes: int, folder: Path) -> list[dict]:
    """Train 3 steps on a corpus of `megabytes` MB, twice: peak memory, time to the first steps, cache hit."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / f"big-{megabytes}mb.txt"
    if not corpus.exists() or corpus.stat().st_size != megabytes * 10**6:
        piece = synthetic_text(10**6, seed=1)
        with open(corpus, "w") as f:
            for _ in range(megabytes):
                f.write(piece)
    cache = folder / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, CHARRNN_CACHE=str(cache))
    rows = []
    for attempt in ("first run (encodes)", "second run (cached)"):
        run = folder / f"run-{len(rows)}"
        shutil.rmtree(run, ignore_errors=True)
        res = _run_measured([sys.executable, "-m", "charrnn", "train", str(corpus), "--steps", "3", "--hidden", "256",
                             "--run", str(run), "-q", "--device", "cpu"], env, run / "metrics.jsonl")
        row = {"corpus_mb": megabytes, "run": attempt, **res}
        report("big", row)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- quality in a budget


def bench_quality(report: Report, corpus: Path, budget: str, folder: Path) -> dict:
    """`charrnn train CORPUS --time BUDGET` with no other flags; its best validation loss."""
    import json as _json

    run = folder / f"quality-{budget}"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "charrnn", "train", str(corpus), "--time", budget, "--run", str(run), "-q"],
                   check=True)
    wall = time.perf_counter() - t0
    evals = [_json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    best = min(e["val_loss"] for e in evals)
    row = {"corpus": corpus.name, "budget": budget, "wall_s": wall, "best_val_loss": best,
           "best_val_bpc": best / math.log(2), "steps": evals[-1]["step"], "run": str(run)}
    report("quality", row)
    return row


def machine_description() -> str:
    import platform

    return (f"{platform.machine()} {os.cpu_count()} CPU(s), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


# ---------------------------------------------------------------- several processes


def bench_processes(report: Report, hidden: int, steps: int, folder: Path) -> list[dict]:
    """chars/s of 1 process (1 and 2 threads) against torchrun with 2 processes of 1 thread, same total batch."""
    import json as _json
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "ddp.txt"
    corpus.write_text(synthetic_text(600_000, seed=2))
    common = ["train", str(corpus), "--hidden", str(hidden), "--steps", str(steps), "--eval-every", str(10**6),
              "--seq-len", "100", "--batch-size", "32", "-q", "--device", "cpu"]
    setups = [
        ("1 process, 1 thread", [sys.executable, "-m", "charrnn", *common, "--threads", "1"], "1"),
        ("1 process, 2 threads", [sys.executable, "-m", "charrnn", *common, "--threads", "2"], "2"),
        ("torchrun, 2 processes x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2", "-m", "charrnn", *common], "1"),
    ]
    rows = []
    base = None
    for name, cmd, threads in setups:
        run = folder / f"ddp-run-{len(rows)}"
        shutil.rmtree(run, ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        done = subprocess.run([*cmd, "--run-dir", str(run)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            from charrnn.errors import CharRNNError

            log = folder / f"ddp-run-{len(rows)}.stderr.txt"
            log.write_text(done.stderr)
            raise CharRNNError(f"bench processes: '{name}' exited {done.returncode}; its output is in {log}")
        lines = [_json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        cps = [l["chars_per_s"] for l in lines if "chars_per_s" in l][-1]
        base = base or cps
        row = {"setup": name, "chars_per_s": cps, "ratio": cps / base,
               "val_loss": [l["val_loss"] for l in lines if "val_loss" in l][-1]}
        report("processes", row)
        rows.append(row)
    return rows
