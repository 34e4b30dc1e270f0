"""`python -m e2evlp`: the same as the `e2evlp` command."""

import sys

from e2evlp.cli import main

sys.exit(main())
