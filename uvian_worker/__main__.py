"""`python -m uvian_worker` runs the CLI."""

import sys

from uvian_worker.cli import main

sys.exit(main())
