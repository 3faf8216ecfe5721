"""``python -m surgery`` is the ``surgery`` command."""

import sys

from .cli import main

sys.exit(main())
