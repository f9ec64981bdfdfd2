"""python -m services.demo {seed,run,reset} [--minutes N] [--json PATH]: `fleet demo`."""

import sys

from services.demo.cli import main

sys.exit(main())
