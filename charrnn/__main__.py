"""Entry point for `python -m charrnn` (and `torchrun -m charrnn`)."""

from charrnn.cli import main

main()
