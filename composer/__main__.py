"""`python -m composer` is the `composer` command."""

import sys

from .cli import main

sys.exit(main())
