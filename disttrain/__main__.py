"""`python -m disttrain ...` is the `disttrain` command."""

import sys

from .cli import main

sys.exit(main())
