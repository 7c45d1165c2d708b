"""`python -m disttrain.bench`: see disttrain.bench.runner."""

import sys

from .runner import main

sys.exit(main())
