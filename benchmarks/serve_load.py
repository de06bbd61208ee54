"""Load check of `charrnn serve` on loopback: 1, 8 and 32 concurrent clients, each generating 500 characters.

Usage: python benchmarks/serve_load.py [--run RUN] [--clients 1,8,32] [--length 500] [--rounds 2]
       [--hidden 512 --layers 2] [--time-limit 300]

Starts `charrnn serve` as its own process on a free loopback port (with --run, that run; without,
a model of --layers x --hidden trained for one step on a made-up text: the speed of a step does not
depend on what the weights learnt), then runs the client counts in alternating rounds (1, 8, 32, 1,
8, 32, ...) from one asyncio process, each client streaming one unseeded sample of --length
characters at temperature 1 through POST /api/generate. Per client count it reports total
characters per second (all clients' characters over the wall time of the round) and p50/p95 of each
client's latency to its first and its last character, the median round of each count, beside one
client alone; the server's resident memory (VmRSS) after a warm-up and after the last round; and
errors (any non-200 or a stream without its final line). Bounded: the rounds stop at --time-limit
seconds (each round's requests time out at that bound too). The clients share the CPU with the
server, so on a small machine they cost it some of its speed; the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def made_up_run(folder: Path, layers: int, hidden: int) -> Path:
    words = "the king a fool my lord speaks weeps laughs softly at dawn in the hall for love alone".split()
    text = "".join(f"{words[i % len(words)].capitalize()} {words[(i * 7) % len(words)]}.\n" for i in range(4000))
    (folder / "corpus.txt").write_text(text)
    run = folder / "load"
    subprocess.run([sys.executable, "-m", "charrnn", "train", str(folder / "corpus.txt"), "--layers", str(layers),
                    "--hidden", str(hidden), "--steps", "1", "--run", str(run), "-q"], check=True, cwd=folder)
    return run


async def one_client(client, url: str, length: int) -> tuple[float, float, int]:
    """(seconds to the first character, seconds to the last, characters) of one streamed sample."""
    t0 = time.perf_counter()
    first = last = None
    chars = 0
    done = False
    async with client.stream("POST", url + "/api/generate", json={"length": length, "temperature": 1.0}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line:
                continue
            event = json.loads(line)
            if "text" in event:
                now = time.perf_counter() - t0
                first = now if first is None else first
                last = now
                chars += len(event["text"])
            elif event.get("done"):
                done = True
            else:
                raise RuntimeError(f"stream error: {event}")
    if not done or chars != length:
        raise RuntimeError(f"stream ended after {chars} of {length} characters")
    return first, last, chars


async def one_round(url: str, clients: int, length: int, timeout: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, length) for _ in range(clients)),
                                       return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    firsts, lasts = sorted(r[0] for r in ok), sorted(r[1] for r in ok)
    return {"clients": clients, "chars_per_s": sum(r[2] for r in ok) / wall, "wall_s": wall,
            "first_p50": pct(firsts, 50), "first_p95": pct(firsts, 95), "last_p50": pct(lasts, 50),
            "last_p95": pct(lasts, 95), "errors": errors}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]  # nearest rank


def wait_ready(url: str, proc, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/api/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="the run to serve (default: an untrained --layers x --hidden model)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    ap.add_argument("--time-limit", type=float, default=300.0)
    a = ap.parse_args()
    counts = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        run = a.run or made_up_run(Path(tmp), a.layers, a.hidden)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "charrnn", "serve", str(run), "--port", str(port),
               "--max-streams", str(max(counts) * 2), "--max-length", str(a.length)]
        cmd += ["--threads", str(a.threads)] if a.threads else []
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, proc)
            asyncio.run(one_round(url, 2, 50, a.time_limit))  # warm-up: allocator, first JIT paths
            rss0 = rss_mb(proc.pid)
            start = time.monotonic()
            rounds: dict[int, list[dict]] = {c: [] for c in counts}
            for r in range(a.rounds):
                for c in counts:
                    left = a.time_limit - (time.monotonic() - start)
                    if left <= 0:
                        break
                    s0, c0 = cpu_s(proc.pid), time.process_time()
                    res = asyncio.run(one_round(url, c, a.length, left))
                    res["server_cpu"], res["client_cpu"] = cpu_s(proc.pid) - s0, time.process_time() - c0
                    rounds[c].append(res)
            rss1 = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"charrnn serve load check: {run.name if a.run else f'untrained {a.layers}x{a.hidden} LSTM'}, "
          f"{a.length} characters per client, {a.rounds} rounds alternated, median round shown, "
          f"server --threads {a.threads or 'default'}; "
          f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(f"{'clients':>7} {'chars/s':>9} {'x one':>6} {'first p50':>10} {'first p95':>10} {'last p50':>9} "
          f"{'last p95':>9} {'errors':>6} {'server CPU':>10} {'client CPU':>10}")
    base = None
    for c in counts:
        if not rounds[c]:
            continue
        m = sorted(rounds[c], key=lambda x: x["chars_per_s"])[len(rounds[c]) // 2]
        base = base or m["chars_per_s"]
        errors = sum(len(x["errors"]) for x in rounds[c])
        print(f"{c:>7} {m['chars_per_s']:>9.0f} {m['chars_per_s'] / base:>6.1f} {m['first_p50']:>9.3f}s "
              f"{m['first_p95']:>9.3f}s {m['last_p50']:>8.2f}s {m['last_p95']:>8.2f}s {errors:>6} "
              f"{m['server_cpu']:>9.1f}s {m['client_cpu']:>9.1f}s")
        for x in rounds[c]:
            for e in x["errors"][:3]:
                print(f"  error ({c} clients): {e}")
    print(f"server RSS: {rss0:.0f} MB after warm-up, {rss1:.0f} MB after the last round ({rss1 - rss0:+.0f} MB)")


if __name__ == "__main__":
    main()
