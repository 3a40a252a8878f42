"""`python -m hierloc ...` (also what `torchrun -m hierloc train ...` runs)."""

import sys

from hierloc.cli import main

sys.exit(main())
