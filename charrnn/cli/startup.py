"""Start-up without garbage collection.

Importing torch makes about a million Python objects that live as long as the process. While they are
being made, Python's cyclic garbage collector keeps walking them, which cost 0.13 s of `import torch`
and 0.09 s of the speller's first prefix tree on the machine of docs/speed.md ("First character"). So
`charrnn` holds collection while a command starts, then freezes what start-up made (the collector skips
it from then on) and collects as usual. Most commands settle before they run; `sample` settles once its
model is loaded, just before the first character.
"""

from __future__ import annotations

import gc

SETTLES_ITSELF = {"sample"}  # commands (by function name) that call settle() themselves, once loaded
_held = False


def hold() -> None:
    """Stop collecting until settle(); called by the command-line entry point, never by the library."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def settle() -> None:
    """Freeze what start-up made and collect as usual again (does nothing unless hold() stopped collection)."""
    global _held
    if _held:
        _held = False
        gc.freeze()
        gc.enable()
