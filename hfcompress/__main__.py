"""`python -m hfcompress ...`: the command line (also `torchrun -m hfcompress ...`)."""

import sys

from .commands.cli import main

sys.exit(main())
