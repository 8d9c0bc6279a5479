"""Installing examples/rng the way a user does: a copy out of the tree, pip-installed into a venv."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.core.installed import make_venv, pip_install

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rng"


def install_rng_example(root: Path) -> Path:
    """A venv under ``root`` with vdm-rng-example installed (not editable); returns its python."""
    src = root / "rng"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    python = make_venv(root / "venv")
    pip_install(python, src)
    return python
