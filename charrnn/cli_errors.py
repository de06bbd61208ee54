"""The decorator every CLI command shares: library errors become one line on stderr and an exit code.

Its own module so that command modules beside cli.py (cli_corpus.py) can use it without an import cycle.
"""

from __future__ import annotations

import functools
import sys

import typer

from charrnn.errors import CharRNNError


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from charrnn import ui

        try:
            return fn(*args, **kwargs)
        except CharRNNError as e:
            ui.error(str(e))
            raise typer.Exit(e.exit_code)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): stop quietly
            raise typer.Exit(0)
        except KeyboardInterrupt:
            ui.error("interrupted")
            raise typer.Exit(130)
        except MemoryError:
            ui.error("out of memory; use a smaller --hidden, --batch-size or --seq-len")
            raise typer.Exit(1)

    return wrapper
