"""python -m hmoe: the command line (hmoe.cli)."""

import sys

from hmoe.cli import main

sys.exit(main())
