"""`sample --stop "\\n" --num 8` against generating --length characters and cutting at the first newline.

    python benchmarks/stop_strings.py RUN [--length 500] [--num 8] [--rounds 7] [--threads 1]

In one process, alternating A (stop strings) and B (the full length, then cut) with the same seeds:
the median time of each, their ratio, the model steps each took, and the load average. Then the same
for the whole commands (`charrnn sample RUN --stop '\\n' --num 8` against `charrnn sample RUN --num 8`),
start-up and model loading included. Checks on the way that A's lines are B's texts cut at their
first newline, so the two give the same lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import charrnn
from charrnn.data import Vocab
from charrnn.sample import SampleConfig, generate


def steps_taken(m, cfg: SampleConfig) -> int:
    """Model steps of one generation, counted by a hook that changes nothing."""
    count = [0]

    def hook(layer, t, state):
        count[0] += layer == 0
        return state

    generate(m.module, Vocab(m.vocab), cfg, hook=hook)
    return count[0]


def in_process(m, length: int, num: int, rounds: int) -> None:
    a_times, b_times, a_steps = [], [], []
    for r in range(rounds):  # A, B, A, B ...: both see the same load
        t0 = time.perf_counter()
        lines = m.generate(num=num, length=length, stop="\n", seed=r)
        t1 = time.perf_counter()
        full = m.generate(num=num, length=length, seed=r)
        t2 = time.perf_counter()
        assert lines == [t.split("\n")[0] for t in full], "stop strings changed the text"
        a_times.append(t1 - t0)
        b_times.append(t2 - t1)
        a_steps.append(1 + max(len(t) for t in lines))  # the newline the model starts after, then the longest line
    cfg = SampleConfig(temperature=0.8, length=length, seed=0, num=num, stop=("\n",))
    assert steps_taken(m, cfg) == a_steps[0], "the step count from the texts is not the model's"
    a, b = statistics.median(a_times), statistics.median(b_times)
    sa, sb = statistics.median(a_steps), 1 + length
    print(f"generation, in process: --stop '\\n' {a * 1000:.0f} ms, --length {length} and cut {b * 1000:.0f} ms: "
          f"{b / a:.1f}x faster; model steps {sa:.0f} against {sb} ({sb / sa:.1f}x fewer; per round: "
          f"{', '.join(map(str, a_steps))}); medians of {rounds} alternated rounds")


def commands(run: str, length: int, num: int, rounds: int, threads: int) -> None:
    base = [sys.executable, "-m", "charrnn", "sample", run, "--num", str(num), "--length", str(length), "--temp", "0.8"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # `sample` has no --threads; torch reads this
    a_times, b_times = [], []
    for r in range(rounds):
        seed = ["--seed", str(r)]
        t0 = time.perf_counter()
        subprocess.run(base + seed + ["--stop", "\\n"], check=True, capture_output=True, env=env)
        t1 = time.perf_counter()
        subprocess.run(base + seed, check=True, capture_output=True, env=env)
        t2 = time.perf_counter()
        a_times.append(t1 - t0)
        b_times.append(t2 - t1)
    a, b = statistics.median(a_times), statistics.median(b_times)
    print(f"whole command: --stop '\\n' {a:.2f} s, --length {length} and cut {b:.2f} s: {b / a:.2f}x faster "
          f"(median of {rounds} alternated rounds, start-up and loading included)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--length", type=int, default=500)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    # one thread: on a loaded 2-core machine two torch threads made a sampling step 30-90x slower
    # (their workers wait on each other), which would measure the load, not the steps
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = charrnn.load(args.run)
    c = m.config
    print(f"{m.path}: {c['cell']} {c['layers']}x{c['hidden']}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs; {args.threads} thread(s)")
    in_process(m, args.length, args.num, args.rounds)
    commands(args.run, args.length, args.num, max(3, args.rounds // 2), args.threads)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
