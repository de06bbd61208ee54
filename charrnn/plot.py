"""`charrnn plot`: the validation-loss curves of runs as a PNG, an SVG or a self-contained HTML page (matplotlib).

matplotlib is an optional extra (`pip install "charrnn[plot]"`), imported only here and only when a
plot is drawn. The figure is built without pyplot, so no GUI backend or global figure state is involved.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

from charrnn.atomicfile import atomic_write
from charrnn.curves import Curve
from charrnn.errors import CharRNNError, UsageError

FORMATS = (".png", ".svg", ".html")
X_AXES = ("steps", "time")
MISSING = 'charrnn plot needs matplotlib, which is not installed; install it with: pip install "charrnn[plot]"'


def check_output(out: Path) -> str:
    """The output format from the file name (.png, .svg or .html); anything else is a usage error."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"cannot tell the picture format of -o {out}; name a .png, .svg or .html file")
    return suffix


def labels(curves: list[Curve]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [c.name for c in curves]
    return [c.name if names.count(c.name) == 1 else str(c.run) for c in curves]


def _x(curve: Curve, x: str, minutes: bool) -> list[float]:
    if x == "steps":
        return list(curve.steps)
    return [t / 60 for t in curve.times] if minutes else list(curve.times)


def figure(curves: list[Curve], x: str = "steps"):
    """The matplotlib Figure: one line per run, labelled by run, validation loss against steps or time."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CharRNNError(MISSING) from None
    if x not in X_AXES:
        raise UsageError(f"--x must be one of {', '.join(X_AXES)} (got {x!r})")
    minutes = x == "time" and max(c.times[-1] for c in curves) > 180
    fig = Figure(figsize=(8, 4.5), dpi=120, layout="tight")
    ax = fig.add_subplot()
    for curve, label in zip(curves, labels(curves)):
        few = len(curve.steps) <= 30  # markers show where the evaluations were, while they do not crowd
        ax.plot(_x(curve, x, minutes), curve.losses, marker="o" if few else None, markersize=3, linewidth=1.5,
                label=label)
    ax.set_xlabel("step" if x == "steps" else "time (minutes)" if minutes else "time (seconds)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("validation loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def render(curves: list[Curve], fmt: str, x: str = "steps") -> bytes:
    """The picture's bytes: PNG, SVG (text kept as text, so labels are searchable), or an HTML page."""
    fig = figure(curves, x)
    import matplotlib

    buf = io.BytesIO()
    if fmt == ".png":
        fig.savefig(buf, format="png")
        return buf.getvalue()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "charrnn"}):  # reproducible ids
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue().decode()
    if fmt == ".svg":
        return svg.encode()
    return page(curves, svg[svg.index("<svg"):]).encode()


def page(curves: list[Curve], svg: str) -> str:
    """A self-contained HTML page: the SVG inline and a table of each run's best loss; nothing fetched."""
    rows = []
    for curve, label in zip(curves, labels(curves)):
        best, step = curve.best()
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{best:.4f}</td><td>{best / math.log(2):.4f}</td>"
                    f"<td>{step:,}</td><td>{curve.steps[-1]:,}</td><td>{curve.times[-1] / 60:.1f}</td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>charrnn: validation loss</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body>
{svg}
<table><tr><th>run</th><th>best val loss</th><th>bpc</th><th>at step</th><th>last step</th><th>minutes</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def write_plot(curves: list[Curve], out: Path, x: str = "steps") -> int:
    """Draw the runs that have evaluations into `out` (written atomically); returns its size in bytes."""
    fmt = check_output(out)
    data = render(curves, fmt, x)
    try:
        atomic_write(Path(out), lambda f: f.write(data))
    except OSError as e:
        raise CharRNNError(f"cannot write {out}: {e.strerror or e}; choose another -o path") from None
    return len(data)
