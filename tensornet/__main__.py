"""``python -m tensornet``: the command line (see :mod:`tensornet.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
