"""Everything the user sees on stderr: the training progress bar, tables, warnings and errors (Rich)."""

from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from charrnn.config import CHARS_PER_PARAM
from charrnn.events import (EndEvent, EvalEvent, RollbackEvent, SizingEvent, StartEvent, StepEvent, TrainEvents,
                            WarnEvent)

err = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """One line on stderr: what went wrong, where, and what to do."""
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True) if err.is_terminal else print(
        f"error: {message}", file=sys.stderr
    )


def warn(message: str) -> None:
    if err.is_terminal:
        err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    else:
        print(f"warning: {message}", file=sys.stderr)


def info(message: str, quiet: bool = False) -> None:
    if quiet:
        return
    if err.is_terminal:
        err.print(message, soft_wrap=True)
    else:
        print(message, file=sys.stderr)


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def lr_note(scale: float) -> str:
    """The progress bar's mark of a run whose learning rate rollbacks lowered: '  lr x0.5'; '' otherwise."""
    return f"  [yellow]lr x{scale:.3g}[/]" if scale < 1.0 else ""


def sizing_line(e: SizingEvent) -> str:
    """'sizing: 2x128 61,200 chars/s (183.6/param), ... [measured in 2.1s]; chose 2x256, the widest ...' (one line)."""
    speeds = ", ".join(f"{e.layers}x{h} {cps:,.0f} chars/s ({e.chars_per_param[h]:,.1f}/param)"
                       for h, cps in e.chars_per_s.items())
    how = f"measured in {e.seconds:.1f}s" if e.timed else "cached"
    if len(e.timed) not in (0, len(e.chars_per_s)):
        how += f", {len(e.chars_per_s) - len(e.timed)} cached"
    why = ("the widest reading at least" if e.chars_per_param[e.hidden] >= e.rule else "the narrowest: none reads")
    fresh = " (less than one pass over the text)" if e.rule < CHARS_PER_PARAM else ""
    return (f"sizing: {speeds} [{how}]; chose {e.layers}x{e.hidden}, {why} {e.rule:g} training chars per "
            f"parameter in {fmt_duration(e.budget_s)}{fresh}")


class TrainDisplay(TrainEvents):
    """The training events' receiver: a progress bar on a terminal, plain evaluation lines otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task = None

    def _bar(self) -> Progress:
        return Progress(
            TextColumn("[bold]step {task.completed:>6.0f}/{task.total:<6.0f}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  bpc {task.fields[bpc]:.3f}  val {task.fields[val]}"),
            TextColumn("{task.fields[cps]:>7,.0f} chars/s  |g| {task.fields[gnorm]:.2f}{task.fields[note]}"),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )

    def on_sizing(self, e: SizingEvent) -> None:
        info(sizing_line(e), self.quiet)

    def on_start(self, e: StartEvent) -> None:
        c = e.config
        what = "resuming" if e.resumed_from else "training"
        length = f"{fmt_duration(e.time_budget_s)} budget" if e.time_budget_s else f"{e.total_steps} steps"
        info(f"{what} {c.cell} {c.layers}x{c.hidden} ({e.params / 1e6:.2f}M params) on "
             f"{e.train_chars:,} chars (val {e.val_chars:,}, vocab {e.vocab_size}), "
             f"seq {c.seq_len} x batch {c.batch_size}, dropout {c.dropout:g}, {length}, {e.device}, {e.precision} "
             f"({e.precision_why})",
             self.quiet)
        info(f"run folder: {e.run_dir}", self.quiet)
        if self.live:
            self.progress = self._bar()
            self.progress.start()
            self.task = self.progress.add_task("train", total=e.total_steps, completed=e.resumed_from or 0,
                                               loss=float("nan"), bpc=float("nan"), val="-", cps=0.0, gnorm=0.0,
                                               note="")

    def on_step(self, e: StepEvent) -> None:
        if self.progress is not None:
            total = e.total_steps if e.total_steps < 10**8 else None
            self.progress.update(self.task, completed=e.step, total=total, loss=e.loss,
                                 bpc=e.loss / math.log(2), cps=e.recent_chars_per_s, gnorm=e.grad_norm,
                                 note=lr_note(e.lr_scale))

    def on_eval(self, e: EvalEvent) -> None:
        mark = " (best)" if e.best else ""
        line = (f"step {e.step:>6}  val loss {e.val_loss:.4f}  val bpc {e.val_bpc:.4f}  "
                f"{e.chars_per_s:,.0f} chars/s  {fmt_duration(e.elapsed_s)}{mark}")
        if self.progress is not None:
            self.progress.update(self.task, val=f"{e.val_loss:.3f}")
            self.progress.console.print(line)
            if e.sample is not None:
                self.progress.console.print(sample_block(e.sample), style="dim", markup=False, highlight=False)
        else:
            info(line, self.quiet)
            if e.sample is not None:
                info(sample_block(e.sample), self.quiet)

    def on_warn(self, e: WarnEvent) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[yellow]warning:[/] {e.message}")
        else:
            warn(e.message)

    def on_rollback(self, e: RollbackEvent) -> None:
        """A rollback: its warning above the bar, and the lowered learning rate on the bar itself."""
        self.on_warn(WarnEvent(e.message))
        if self.progress is not None:
            self.progress.update(self.task, note=lr_note(e.lr_scale))

    def on_end(self, e: EndEvent) -> None:
        self.close()
        if e.reason == "interrupted":
            info(f"stopped by signal at step {e.step}; saved {e.path}. "
                 f"Continue with: charrnn train --resume {e.run_dir}", False)
            return
        best = e.best_val_loss
        if e.reason == "early stop":
            info(f"stopped early: no better validation loss in the last {e.patience} evaluations "
                 "(the model had begun to overfit; --patience 0 trains to the end)", self.quiet)
        best_txt = f"{best:.4f} nats/char ({best / math.log(2):.4f} bpc) at step {e.best_step}" if best else "-"
        info(f"done: {e.step} steps in {fmt_duration(e.elapsed_s)}, {e.chars_per_s:,.0f} chars/s; "
             f"best val loss {best_txt}", self.quiet)
        info(f"sample it: charrnn sample {e.run_dir} --temp 0.8", self.quiet)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


SAMPLE_GUTTER = "  │ "  # marks the lines of an evaluation's sample under its line


def sample_block(text: str) -> str:
    """An evaluation's sample as indented lines; control characters (an escape sequence the model made
    up would restyle the terminal) shown as U+FFFD, tabs as spaces."""
    clean = "".join(c if c == "\n" or c.isprintable() else " " if c == "\t" else "\ufffd" for c in text)
    return "\n".join(SAMPLE_GUTTER + line for line in clean.rstrip("\n").split("\n"))


def runs_table(rows: list[dict]) -> None:
    t = Table(title="runs", title_justify="left")
    for col, just in (("run", "left"), ("cell", "left"), ("size", "left"), ("checkpoints", "right"),
                      ("last step", "right"), ("best val loss", "right"), ("best bpc", "right"),
                      ("disk", "right"), ("updated", "left")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(r["run"], r["cell"], r["size"], str(r["checkpoints"]), str(r["last_step"]),
                  "-" if r["best"] is None else f"{r['best']:.4f}",
                  "-" if r["best"] is None else f"{r['best'] / math.log(2):.4f}",
                  fmt_size(r["disk"]), r["updated"])
    _print_table(t)


def checkpoints_table(title: str, rows: list[dict]) -> None:
    t = Table(title=title, title_justify="left")
    for col, just in (("file", "left"), ("step", "right"), ("val loss", "right"), ("val bpc", "right"),
                      ("size", "right"), ("", "left")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(r["file"], str(r["step"]), "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
                  "-" if r["val_loss"] is None else f"{r['val_loss'] / math.log(2):.4f}", fmt_size(r["size"]),
                  r["mark"])
    _print_table(t)


def loss_curve(curve) -> None:
    """`checkpoints show RUN`: the run's validation loss by step (a curves.Curve) as a text chart, as wide
    as the terminal; box-drawing characters where the terminal's encoding has them, ASCII otherwise."""
    from charrnn.curves import text_chart

    if not curve.losses:
        info(f"no validation loss in {curve.run}/metrics.jsonl yet")
        return
    best, best_step = curve.best()
    width = min(err.width, 120) if err.is_terminal else 80
    ascii = not (err.encoding or "").lower().replace("-", "").startswith("utf")
    info(f"validation loss (nats/char): {curve.losses[0]:.4f} at step {curve.steps[0]} -> {curve.losses[-1]:.4f} "
         f"at step {curve.steps[-1]}; best {best:.4f} at step {best_step}")
    for line in text_chart(curve.steps, curve.losses, width=width, ascii=ascii):
        print(line, file=sys.stderr)  # plain: Rich would read '[' as markup and rewrap the lines


def kv_table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    _print_table(t)


def checkpoint_card(d: dict, format_note: str | None = None) -> None:
    """`checkpoints show`: runs.checkpoint_details as a two-column table (format_note: runs.format_note)."""
    mc, st_best, vl = d["model"], d["best_val_loss"], d["val_loss"]
    rows = [
        ("checkpoint", d["checkpoint"]),
        ("model", f"{mc['cell']} {mc['layers']}x{mc['hidden']}, embed {mc['embed'] or mc['hidden']}, "
                  f"dropout {mc['dropout']}, {d['params'] / 1e6:.2f}M params"),
        ("step", f"{d['step']} of {d['total_steps']}"),
        ("val loss", "-" if vl is None else f"{vl:.4f} nats/char ({vl / math.log(2):.4f} bpc)"),
        ("best in run", "-" if st_best is None else f"{st_best:.4f} at step {d['best_step']}"),
        ("trained for", fmt_duration(d["elapsed_s"])),
        ("corpus", ", ".join(d["corpus"])),
        ("vocabulary", f"{d['vocab_size']} characters"),
        ("settings", ", ".join(f"{k}={v}" for k, v in d["train"].items() if v is not None)),
        ("versions", ", ".join(f"{k} {v}" for k, v in (d["versions"] or {}).items())),
    ]
    if format_note:
        rows.append(("format", format_note))
    if d["sentiment"]:
        s = d["sentiment"]
        rows.append(("sentiment unit", f"unit {s.get('unit')} (polarity {s.get('polarity')})"))
    kv_table("checkpoint", rows)


def _print_table(t: Table) -> None:
    """Tables go to stderr, as the CLI contract says; uncoloured and wide when it is not a terminal."""
    (err if err.is_terminal else Console(stderr=True, width=160, no_color=True)).print(t)


class DownloadDisplay:
    """The download callback: a byte progress bar per file on a terminal, one line per file otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress: Progress | None = None
        self.tasks: dict[str, object] = {}

    def __call__(self, event: str, d: dict) -> None:
        getattr(self, f"on_{event}", lambda d: None)(d)

    def on_start(self, d: dict) -> None:
        info(f"downloading {d['file']} ({fmt_size(d['bytes'])}) from {d['source']}", self.quiet)
        if self.live:
            from rich.progress import DownloadColumn, TransferSpeedColumn

            if self.progress is None:
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                         TransferSpeedColumn(), TimeRemainingColumn(), console=err)
                self.progress.start()
            self.tasks[d["name"]] = self.progress.add_task(d["file"], total=d["bytes"])

    def on_progress(self, d: dict) -> None:
        if self.progress is not None and d["name"] in self.tasks:
            self.progress.update(self.tasks[d["name"]], completed=d["done"], total=d["total"])

    def on_end(self, d: dict) -> None:
        if d["status"] == "present":
            info(f"{d['path']} is already here with the right checksum; nothing to download", self.quiet)
        else:
            if d["status"] == "replaced":
                self.warn_above(f"{d['path']} had another checksum; replaced it with the verified copy")
            self.print_above(f"saved {d['path']} (SHA-256 verified)")

    def print_above(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            info(line, self.quiet)

    def warn_above(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[yellow]warning:[/] {message}")
        else:
            warn(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def corpora_table(rows: list[dict]) -> None:
    """The catalogue: one row per corpus or group, with whether it is downloaded and where it comes from."""
    cells = [(r["name"], r["format"], fmt_size(r["bytes"]), r["here"], r["fetch"], r["description"]) for r in rows]
    t = Table(title="corpora", title_justify="left")
    used = 4  # the table's outer border and the description's padding and border
    for i, (col, just) in enumerate((("name", "left"), ("format", "left"), ("size", "right"), ("here", "center"),
                                     ("fetch", "left"))):
        width = max([len(col)] + [len(c[i]) for c in cells])  # these keep their width: the description is cut
        t.add_column(col, justify=just, no_wrap=True, width=width)
        used += width + 3
    room = (err.width if err.is_terminal else 160) - used
    t.add_column("description", no_wrap=True, overflow="ellipsis", width=max(12, min(72, room)))
    for c in cells:
        t.add_row(*c)
    _print_table(t)


BENCH_FORMAT = {
    "train": "{shape} on {device} in {precision}: raw loop {raw_chars_per_s:,.0f} chars/s, charrnn {charrnn_chars_per_s:,.0f} chars/s, "
             "ratio {ratio:.3f}; memory growth over the run {rss_growth_mb:+.1f} MB",
    "sample": "{model} ({weights_mb:.1f} MB of fp32 weights): raw LSTMCell loop fp32 {raw_chars_per_s:,.0f} chars/s, "
              "bf16 {raw_bf16_chars_per_s:,.0f}; charrnn ({precision}) {charrnn_chars_per_s:,.0f} chars/s, ratio "
              "{ratio:.2f} to the faster raw ({best_raw}); charrnn fp32 {fp32_chars_per_s:,.0f}, ratio {fp32_ratio:.2f} "
              "to raw fp32; with --words known (10,000 words) {known_words_chars_per_s:,.0f} chars/s ({known_words_ratio:.2f}x); "
              "--num {num} ({batched_precision}): {batched_chars_per_s:,.0f} chars/s ({batched_ratio:.1f}x "
              "one stream; fp32 {batched_fp32_ratio:.1f}x); first character after {first_char_s:.2f} s "
              "(python -c 'import torch' alone: {import_torch_s:.2f} s); "
              "load average {load_average:.1f}",
    "startup": "{command}: {seconds:.3f} s",
    "cells": "{shape}, {threads} threads: fused lstm {lstm_chars_per_s:,.0f} chars/s, mlstm {mlstm_chars_per_s:,.0f} "
             "chars/s, ratio {ratio:.2f}; load average {load_average:.1f}",
    "precision": "{shape} on {device}: {bf16_txt}",
    "processes": "{setup}: {chars_per_s:,.0f} chars/s ({ratio:.2f}x one process with one thread), "
                 "val loss {val_loss:.4f}",
    "big": "{corpus_mb} MB corpus, {run}: exit {exit_code}, first steps done after {first_step_txt} s, "
           "total {total_s:.1f} s, peak RSS {peak_rss_mb:,.0f} MB",
    "quality": "train {corpus} --time {budget}: best val loss {best_val_loss:.4f} nats/char "
               "({best_val_bpc:.4f} bpc) after {steps} steps, {wall_s:.0f} s wall",
}


def bench_row(section: str, row: dict) -> None:
    extra = {}
    if section == "big":
        extra["first_step_txt"] = "-" if row.get("first_step_s") is None else f"{row['first_step_s']:.1f}"
    if section == "precision":
        extra["bf16_txt"] = _bf16_text(row)
    info(f"[{section}] " + BENCH_FORMAT[section].format(**row, **extra))


def _bf16_text(row: dict) -> str:
    """A bench "precision" row: bf16 over fp32 for charrnn and the raw loop, or why charrnn refused bf16."""
    raw = (f"raw loop bf16 {row['raw_bf16_chars_per_s']:,.0f} vs fp32 {row['raw_fp32_chars_per_s']:,.0f} chars/s, "
           f"{row['raw_speedup']:.2f}x" if row["raw_error"] is None else f"raw loop bf16 fails: {row['raw_error']}")
    if row["refused"] is not None:
        return f"charrnn refuses bf16 here ({row['refused']}); {raw}"
    return (f"charrnn bf16 {row['charrnn_bf16_chars_per_s']:,.0f} vs fp32 {row['charrnn_fp32_chars_per_s']:,.0f} "
            f"chars/s, {row['speedup']:.2f}x; {raw}")


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], lo: float, hi: float) -> str:
    """Blocks on a log scale between lo and hi (positive), one per value."""
    a, b = math.log10(lo), math.log10(hi)
    span = max(b - a, 1e-12)
    out = []
    for v in values:
        x = (math.log10(max(v, lo)) - a) / span
        out.append(SPARK[min(len(SPARK) - 1, max(0, int(x * len(SPARK))))])
    return "".join(out)


def gradient_flow_table(title: str, result: dict) -> None:
    """`charrnn gradients`: per layer, |d loss_T / d h_{T-k}| at a few k and a log-scale sparkline over all k."""
    ks, norms = result["k"], result["norms"]
    marks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= ks[-1]]
    if ks[-1] not in marks:
        marks.append(ks[-1])
    flat = [v for row in norms for v in row if v > 0] or [1.0]
    lo, hi = min(flat), max(flat)
    t = Table(title=title, title_justify="left", caption=f"sparkline: k = 1..{ks[-1]}, log scale "
              f"{lo:.1e} .. {hi:.1e}; mean over {result['windows']} windows", caption_justify="left")
    t.add_column("layer", justify="right")
    for k in marks:
        t.add_column(f"k={k}", justify="right")
    t.add_column("k=1..K")
    for layer, row in enumerate(norms):
        t.add_row(str(layer), *[f"{row[k - 1]:.2e}" for k in marks], sparkline(row, lo, hi))
    _print_table(t)


def neuron_find_table(res, checkpoint: str, fitted_on: str, tested_on: str, n_fit: int, saved: str | None,
                      seconds: float) -> None:
    """`charrnn neuron find`: the chosen unit, its accuracy alone and the all-unit model's, and the top units."""
    t = Table(title=f"sentiment unit of {checkpoint}", title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("unit", f"{res.unit} (layer {res.layer}, state {res.state}), polarity {res.polarity:+d}, "
                      f"rank {res.rank} by |weight|")
    t.add_row("single-unit accuracy", f"{res.single_unit_accuracy:.1%} on {res.test_examples} test examples "
                                      f"(validation {res.val_single_unit_accuracy:.1%})")
    t.add_row("all-units accuracy", f"{res.all_units_accuracy:.1%} (validation {res.val_all_units_accuracy:.1%}; "
                                    f"L1 strength {res.lam:.2e}, {res.nonzero} non-zero weights)")
    t.add_row("fix values", f"positive {res.fix_values['positive']:+.3f}, negative {res.fix_values['negative']:+.3f}")
    t.add_row("top units", ", ".join(f"{u}" + (f"@{l}" if l != res.layer else "") + f" ({w:+.2f})"
                                     for l, u, w in res.top_units))
    t.add_row("data", f"fitted on {n_fit} examples of {fitted_on}; tested on {tested_on}; {fmt_duration(seconds)}")
    t.add_row("stored", saved or "not stored (--no-save)")
    _print_table(t)


def unit_text(text: str, colors: list[tuple[int, int, int]], legend: str) -> None:
    """`charrnn neuron show`: each character on its colour (plain text when stderr is not a terminal)."""
    from rich.text import Text

    out = Text()
    for ch, (r, g, b) in zip(text, colors):
        out.append(ch, style=f"black on rgb({r},{g},{b})" if ch != "\n" else None)
    console = err if err.is_terminal else Console(stderr=True, width=160, no_color=True)
    console.print(out, soft_wrap=True)
    info(legend)


def fmt_age(t: float) -> str:
    """How long ago a moment was: '3 min ago', '2 h ago', '5 days ago'."""
    import time

    s = max(0.0, time.time() - t)
    if s < 3600:
        return f"{int(s // 60)} min ago"
    return f"{int(s // 3600)} h ago" if s < 86400 else f"{int(s // 86400)} days ago"


def cache_table(title: str, rows: list[dict]) -> None:
    """The encoded-corpus cache: one row per cached file."""
    t = Table(title=f"corpus cache: {title}", title_justify="left")
    for col, just in (("from file", "left"), ("characters", "right"), ("vocab", "right"), ("disk", "right"),
                      ("last used", "left")):
        t.add_column(col, justify=just)
    for r in rows:
        old = "" if r["current"] else " (older charrnn; not used)"
        t.add_row(r["source"] + old, "-" if r["chars"] is None else f"{r['chars']:,}",
                  "-" if r["vocab_size"] is None else str(r["vocab_size"]), fmt_size(r["bytes"]),
                  fmt_age(r["last_used"]))
    _print_table(t)


def neuron_score_table(res, rec: dict, checkpoint: str, file: str, show: int, seconds: float) -> None:
    """`charrnn neuron score` on a terminal: the most positive and most negative texts, then a summary."""
    rows = res.rows()
    key = "p_positive" if res.p_positive is not None else "value"
    sign = 1 if key == "p_positive" else rec.get("polarity", 1)  # without a fit, the unit's polarity orders them
    rows.sort(key=lambda r: -sign * r[key])
    picked = rows if len(rows) <= 2 * show else rows[:show] + [None] + rows[-show:]
    t = Table(title=f"{file}, most positive first", title_justify="left")
    for col, just in (("line", "right"), ("P(pos)", "right"), ("value", "right"), ("label", "right"), ("text", "left")):
        if col != "label" or res.labels is not None:
            t.add_column(col, justify=just, no_wrap=col != "text", overflow="ellipsis")
    for r in picked:
        if r is None:
            t.add_row("...", f"{len(rows) - 2 * show} more", "", *([""] if res.labels is not None else []), "(--jsonl lists all)")
            continue
        label = [] if res.labels is None else [str(r["label"]) + ("" if r["correct"] is None else " ok" if r["correct"] else " x")]
        t.add_row(str(r["line"]), "-" if r["p_positive"] is None else f"{r['p_positive']:.3f}", f"{r['value']:+.3f}",
                  *label, r["text"][:200].replace("\t", " "))
    _print_table(t)
    fit = rec.get("logistic") or {}
    ps = res.p_positive
    summary = [
        ("checkpoint", checkpoint),
        ("unit", f"{rec['unit']} (layer {rec['layer']}, {rec['state'].split('+')[0]}), from {rec.get('source', '?')}"),
        ("fit", f"P(positive) = sigmoid({fit['slope']:.4g} * value {'-' if fit['intercept'] < 0 else '+'} "
                f"{abs(fit['intercept']):.4g}), fitted on {fit.get('fitted_on', '?')}" if fit else "none stored: values only"),
        ("texts", f"{len(rows):,} in {seconds:.2f} s" + (f" ({len(rows) / seconds:,.0f} texts/s)" if seconds > 0 else "")),
    ]
    if ps is not None:
        summary.append(("positive", f"{float((ps > 0.5).double().mean()):.1%} of texts (mean P {float(ps.mean()):.3f})"))
    if res.accuracy is not None:
        summary.append(("accuracy", f"{res.accuracy:.1%} against the labels"))
    kv_table("summary", summary)
