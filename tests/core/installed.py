"""Installing small plugin distributions for real, and running ``vdm`` against them.

Two ways, both seen by ``importlib.metadata`` exactly like a ``pip install``:

* :func:`write_dist` writes a distribution's files and its ``*.dist-info`` directory (METADATA,
  entry_points.txt, RECORD) into a directory that a subprocess gets on ``PYTHONPATH`` -- fast, no
  build step, used for the many small plugins of the discovery tests;
* :func:`make_venv` + :func:`pip_install` build a virtual environment that sees this machine's
  packages (``--system-site-packages``) and pip-install a project directory into it -- the way a
  user installs a third-party plugin.
"""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

import pytest

#: Environment variables that change what vdm loads; cleared for every run unless given.
VDM_VARS = ("VDM_PLUGINS", "VDM_PREFER")


def write_dist(
    site: Path, name: str, version: str, entry_points: Mapping[str, str], files: Mapping[str, str]
) -> Path:
    """Install distribution ``name`` into ``site``: its ``files`` and a dist-info directory."""
    site.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[vdm.plugins]\n{eps}")
    (info / "INSTALLER").write_text("tests\n")
    record = [f"{rel},," for rel in files] + [f"{info.name}/{f},," for f in ("METADATA", "entry_points.txt")]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


def clean_env(
    extra: Mapping[str, str] | None = None,
    pythonpath: Sequence[Path] = (),
    *,
    inherit_pythonpath: bool = True,
) -> dict[str, str]:
    """This process's environment without VDM_* settings; ``pythonpath`` goes first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in VDM_VARS and k != "PYTHONPATH"}
    paths = [str(p) for p in pythonpath]
    if inherit_pythonpath and os.environ.get("PYTHONPATH"):  # e.g. tests run with PYTHONPATH=core/src
        paths.append(os.environ["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def run_vdm(
    args: Sequence[str],
    *,
    python: str | Path = sys.executable,
    env: Mapping[str, str] | None = None,
    pythonpath: Sequence[Path] = (),
    cwd: Path | None = None,
    python_flags: Sequence[str] = (),
    inherit_pythonpath: bool = True,
) -> subprocess.CompletedProcess:
    """``vdm ARGS`` in a fresh interpreter (``python -m vdm.cli.main``)."""
    return subprocess.run(
        [str(python), *python_flags, "-m", "vdm.cli.main", *args],
        env=clean_env(env, pythonpath, inherit_pythonpath=inherit_pythonpath),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def list_plugins_json(**kw) -> dict:
    proc = run_vdm(["list-plugins", "--json"], **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def parse_table(stdout: str) -> dict[str, dict[str, str]]:
    """``vdm list-plugins``'s table as {name: {column: value}}, columns cut at the header's offsets."""
    lines = [ln for ln in stdout.splitlines() if ln and not ln.startswith("conflict: ")]
    header = lines[0]
    cols = header.split()
    starts = [header.index(c) for c in cols]
    rows = {}
    for line in lines[1:]:
        cells = [
            line[s : (starts[i + 1] if i + 1 < len(starts) else None)].strip() for i, s in enumerate(starts)
        ]
        rows[cells[0]] = dict(zip((c.lower() for c in cols), cells))
    return rows


# ---- real installs into a virtual environment -------------------------------------------------------


def _can_build_offline() -> bool:
    """setuptools can build a wheel without fetching anything (wheel installed, or setuptools>=70.1)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        import setuptools

        major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
        return (major, minor) >= (70, 1)
    except Exception:
        return False


def make_venv(path: Path) -> Path:
    """A virtual environment that also sees this interpreter's packages; returns its python.

    ``--system-site-packages`` alone is not enough when the tests themselves run in a virtual
    environment (a new venv sees the *base* interpreter's packages), so the new environment also
    gets a ``.pth`` file that adds this environment's site directories, processing their ``.pth``
    files (editable installs) too.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
        check=True,
        timeout=120,
    )
    python = path / "bin" / "python"
    dirs = [d for d in (*site.getsitepackages(), site.getusersitepackages()) if os.path.isdir(d)]
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)
    (Path(_site_packages(python)) / "_vdm_tests_parent_env.pth").write_text(lines)
    return python


def _site_packages(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, env=clean_env(),
    )
    return out.stdout.strip()


def pip_install(python: Path, *projects: Path) -> None:
    """``pip install --no-deps PROJECT...`` into the environment of ``python`` (skips if impossible)."""
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
           "--disable-pip-version-check"]
    if _can_build_offline():
        cmd.append("--no-build-isolation")
    proc = subprocess.run([*cmd, *map(str, projects)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "--python" in proc.stderr:  # pip older than 22.3: install by path
        cmd[3:5] = []
        cmd += ["--target", _site_packages(python)]
        proc = subprocess.run([*cmd, *map(str, projects)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "--no-build-isolation" not in cmd and ("network" in proc.stderr.lower() or "index" in proc.stderr):
            pytest.skip("cannot build a wheel here: install 'wheel' or allow pip to fetch setuptools")
        raise AssertionError(f"pip install failed:\n{proc.stdout}\n{proc.stderr}")
