"""``python3 -m vdm_lab``: see :mod:`vdm_lab.cli`."""

import sys

from .cli import main

sys.exit(main())
