"""Moved: the real-guest harness is the ``vdm-lab`` distribution (``lab/``, ``import vdm_lab``).

This module stays so that ``python3 tests/realguest/harness.py kit|lab|qemu ...`` (scripts/demo.sh,
scripts/kvmlab/run.sh, older notes) keeps working; it is ``python3 -m vdm_lab``. Importing it
gives vdm_lab's names with a DeprecationWarning.
"""

from __future__ import annotations

import sys
import warnings

from vdm_lab import *  # noqa: F403 - the old module's public names
from vdm_lab import __all__  # noqa: F401
from vdm_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())

warnings.warn("tests.realguest.harness moved: import vdm_lab", DeprecationWarning, stacklevel=2)
