"""The decorator every CLI command shares: library errors become one line on stderr and an exit code."""

from __future__ import annotations

import functools
import re
import sys

import typer

from charrnn.cli import startup
from charrnn.errors import CharRNNError


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if fn.__name__ not in startup.SETTLES_ITSELF:
            startup.settle()
        try:
            return fn(*args, **kwargs)
        except CharRNNError as e:
            from charrnn import ui  # imported here, not above: Rich is a tenth of a second `sample` need not wait for

            ui.error(str(e))
            raise typer.Exit(e.exit_code)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): stop quietly
            raise typer.Exit(0)
        except KeyboardInterrupt:
            from charrnn import ui

            ui.error("interrupted")
            raise typer.Exit(130)
        except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
            if not out_of_memory(e):
                raise
            from charrnn import ui

            ui.error(f"out of memory{_asked(e)}; {OOM_HINTS.get(fn.__name__, OOM_HINT)}")
            raise typer.Exit(1)
        finally:
            startup.settle()

    return wrapper


# What to lower, by command (the function's name); others get OOM_HINT.
OOM_HINTS = {
    "sample": "use a smaller --num (samples run together as one batch)",
    "train": "use a smaller --hidden, --batch-size or --seq-len",
}
OOM_HINT = "use a smaller model or input"


def out_of_memory(e: BaseException) -> bool:
    """Whether e says an allocation failed: Python's MemoryError, torch's OutOfMemoryError (CUDA, MPS),
    or the RuntimeError torch's CPU allocator raises ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _asked(e: BaseException) -> str:
    """' (asked for 80.0 GB at once)' when torch's message says how much, else ''."""
    m = re.search(r"tried to allocate (\d+) bytes", str(e)) or re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(e))
    if not m:
        return ""
    size = m.group(1)
    if size.isdigit():
        from charrnn.ui import fmt_size

        size = fmt_size(int(size))
    return f" (asked for {size} at once)"
