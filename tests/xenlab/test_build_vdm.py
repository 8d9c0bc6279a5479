"""The Xen lab's vdm layer builds from a fresh virtual environment (issue 20, "Also").

``scripts/xenlab/build.sh`` installs this checkout's vdm into the dom0 image with ``pip --target``.
It used to run that with whatever ``python3`` came first on PATH, and a fresh venv has no ``wheel``
("error: invalid command 'bdist_wheel'"). Only that step runs here (``XENLAB_STAGE=vdm``: no root,
no downloads, a few seconds), with a fresh venv first on PATH as a user's would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "xenlab" / "build.sh"

CAN_BUILD = (
    "import importlib.util, sys, setuptools; "
    "v = tuple(int(x) for x in setuptools.__version__.split('.')[:2]); "
    "sys.exit(0 if v >= (70, 1) or importlib.util.find_spec('wheel') else 1)"
)


def _can_build(python: str) -> bool:
    return subprocess.run([python, "-c", CAN_BUILD], capture_output=True, timeout=60).returncode == 0


def test_vdm_layer_builds_with_a_fresh_venv_first_on_path(tmp_path: Path) -> None:
    if shutil.which("flock") is None:
        pytest.skip("build.sh needs flock (util-linux)")
    others = [p for p in ("/usr/bin/python3", sys.executable) if os.path.exists(p) and _can_build(p)]
    if not others:
        pytest.skip("no Python on this machine can build a wheel offline (install python3-wheel)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    assert not _can_build(str(venv / "bin" / "python3"))  # the situation of the report
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", XENLAB_STAGE="vdm")
    env.pop("XENLAB_PYTHON", None)
    out = tmp_path / "lab"
    r = subprocess.run([str(BUILD), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    pkgs = out / ".work" / "vdm-pkgs"
    assert (pkgs / "vdm" / "cli" / "main.py").is_file()
    (xen,) = pkgs.glob("vdm_xen-*.dist-info")
    assert "xen = vdm_xen.plugin" in (xen / "entry_points.txt").read_text()
    assert (pkgs / "vdm_blk").is_dir() and not (pkgs / "bin").exists()
