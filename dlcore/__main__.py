"""``python -m dlcore check``: parity of every op on this machine (see dlcore/check.py)."""

import sys

from .check import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "check":
        sys.exit("usage: python -m dlcore check [--device cpu|cuda] [--backend NAME]")
    sys.exit(main(sys.argv[2:]))
