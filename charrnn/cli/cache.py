"""`charrnn cache list|clear`: the encoded-corpus cache (see charrnn/cache.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from charrnn.cli.errors import handle_errors

cache_app = typer.Typer(help="The encoded-corpus cache: list its entries, free its space.", no_args_is_help=True)


@cache_app.command("list")
@handle_errors
def cache_list(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per entry on stdout.")] = False,
):
    """The cached corpora: the file each came from, characters, vocabulary size, disk use, last use."""
    from charrnn import cache, ui

    entries = cache.entries()
    if json_out:
        for e in entries:
            print(json.dumps(asdict(e)))
        return
    if not entries:
        ui.info(f"the corpus cache in {cache.cache_dir()} is empty")
        return
    ui.cache_table(str(cache.cache_dir()), [asdict(e) for e in entries])


@cache_app.command("clear")
@handle_errors
def cache_clear():
    """Delete the cached corpora (they are encoded again when next used) and this machine's measured speeds (taken again when next needed); runs using a corpus are not disturbed."""
    from charrnn import cache, ui

    done = cache.clear()
    busy = f"; {done.busy} file(s) being written by a running encode left alone" if done.busy else ""
    ui.info(f"cleared the cache in {cache.cache_dir()}: {done.files} file(s), "
            f"{ui.fmt_size(done.bytes)} freed{busy}")
