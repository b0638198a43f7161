"""python -m pto: the ``pto`` command (status, trace summarize, keygen)."""

import sys

from .tools.cli import main

sys.exit(main())
