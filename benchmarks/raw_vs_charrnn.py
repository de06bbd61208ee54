"""charrnn against raw PyTorch loops at the same shapes: `charrnn bench`, run as a script from a clone.

The measurements live in the package (charrnn/bench.py) so that an installed charrnn, which has no
benchmarks/ folder, still has `charrnn bench`; this script is the same command, listed here with
the other benchmarks.

    python benchmarks/raw_vs_charrnn.py [--sections train,sample,startup] [any `charrnn bench` option]
"""

import sys

from charrnn.cli import main

if __name__ == "__main__":
    sys.argv = ["charrnn bench", "bench", *sys.argv[1:]]
    main()
