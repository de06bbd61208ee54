"""`charrnn corpus list|get`: the known public corpora, downloaded into ./corpora/ with a checksum."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.errors import handle_errors
from charrnn.cli.options import Quiet

corpus_app = typer.Typer(help="Known public corpora: list them, download them with a checksum.", no_args_is_help=True)

DirOption = Annotated[Path, typer.Option("--dir", help="Folder the corpora are downloaded into.")]


@corpus_app.command("list")
@handle_errors
def corpus_list(
    dir: DirOption = Path("corpora"),
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per corpus and group on stdout.")] = False,
):
    """The catalogue: name, format, size, whether it is in --dir, and whether it needs a mirror."""
    from charrnn import corpora, ui

    cat = corpora.load_catalog()
    here = {n: corpora.is_present(e, dir, verify=False) for n, e in cat.entries.items()}
    if json_out:
        for n, e in cat.entries.items():
            print(json.dumps({"kind": "corpus", **asdict(e), "path": str(dir / e.file), "present": here[n]}))
        for g in cat.groups.values():
            print(json.dumps({"kind": "group", "name": g.name, "description": g.description,
                              "members": list(g.members), "bytes": cat.size_of(g)}))
        return
    rows = [{"name": n, "format": e.format, "bytes": e.bytes, "here": "yes" if here[n] else "",
             "fetch": "direct" if e.url else "mirror", "description": e.description}
            for n, e in cat.entries.items()]
    for g in cat.groups.values():
        got = sum(here[m] for m in g.members)
        direct = all(cat.entries[m].url for m in g.members)
        rows.append({"name": g.name, "format": f"group of {len(g.members)}", "bytes": cat.size_of(g),
                     "here": f"{got}/{len(g.members)}" if got else "", "fetch": "direct" if direct else "mirror",
                     "description": g.description})
    ui.corpora_table(rows)
    ui.info(f"'charrnn corpus get NAME' downloads into {dir}/; 'mirror' ones need --mirror DIR_OR_URL "
            f"(or {corpora.MIRROR_ENV}): a folder or http:// URL holding the same file names")


@corpus_app.command("get")
@handle_errors
def corpus_get(
    names: Annotated[list[str], typer.Argument(help="Corpus or group names from 'charrnn corpus list'.", show_default=False)],
    mirror: Annotated[Optional[str], typer.Option(
        "--mirror", envvar="CHARRNN_MIRROR", show_default=False,
        help="A folder or base URL (http://...) holding the same file names, used instead of the original source.")] = None,
    dir: DirOption = Path("corpora"),
    quiet: Quiet = False,
):
    """Download corpora into ./corpora/ (or --dir), verify their SHA-256, and print their paths on stdout."""
    from charrnn import corpora, ui

    entries = corpora.resolve_names(corpora.load_catalog(), names)
    display = ui.DownloadDisplay(quiet=quiet)
    try:
        got = corpora.fetch_all(entries, dir, mirror or None, callback=display)
    finally:
        display.close()
    for f in got:
        print(f.path)
