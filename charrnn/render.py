"""Showing a unit's values over text: colours (red through grey to green) and a standalone HTML page.

Used by `neuron show` (the CLI renders the terminal version through ui.py); no torch here.
"""

from __future__ import annotations

import html


def unit_colors(values: list[float], lo: float, hi: float) -> list[tuple[int, int, int]]:
    """Red (at lo and below) through pale grey to green (at hi and above), one RGB per value."""
    red, mid, green = (215, 48, 39), (235, 235, 235), (26, 152, 80)
    out = []
    span = (hi - lo) or 1.0
    for v in values:
        t = min(1.0, max(0.0, (v - lo) / span))
        a, b, f = (red, mid, t * 2) if t < 0.5 else (mid, green, t * 2 - 1)
        out.append(tuple(int(round(x + (y - x) * f)) for x, y in zip(a, b)))
    return out


def color_range(values: list[float], rec: dict | None) -> tuple[float, float]:
    """The values mapped to full red and full green: the record's fix values, else the trace's range."""
    if rec is not None:
        return rec["fix_values"]["negative"], rec["fix_values"]["positive"]
    lo, hi = min(values), max(values)
    m = max(abs(lo), abs(hi)) or 1.0
    return -m, m


def render_html(text: str, values: list[float], colors, title: str) -> str:
    """A standalone page: each character on its colour, its value in a tooltip."""
    spans = []
    for ch, v, (r, g, b) in zip(text, values, colors):
        shown = "<br>" if ch == "\n" else html.escape(ch)
        spans.append(f'<span style="background:rgb({r},{g},{b})" title="{v:.3f}">{shown}</span>')
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>\n"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{font-family:monospace;white-space:pre-wrap;line-height:1.6;font-size:15px}</style></head>\n"
        "<body><h3>" + html.escape(title) + "</h3>\n<p>red: negative, green: positive "
        "(hover a character for the unit's value)</p>\n<pre>" + "".join(spans) + "</pre></body></html>\n"
    )
