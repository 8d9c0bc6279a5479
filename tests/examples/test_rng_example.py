"""The example third-party plugin, installed the way a user installs it.

``examples/rng`` is copied out of the tree, pip-installed (not editable) into a virtual
environment that sees this machine's vdm-core, then its own test suite runs there and ``vdm
list-plugins`` must show it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.core.installed import clean_env, parse_table, run_vdm
from tests.examples.rng_install import EXAMPLE, install_rng_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    return install_rng_example(tmp_path_factory.mktemp("rng"))


def test_installed_into_the_venv_not_the_tree(venv):
    proc = subprocess.run(
        [str(venv), "-c", "import vdm_rng, sys; print(vdm_rng.__file__); print(sys.prefix)"],
        capture_output=True, text=True, env=clean_env(), check=True,
    )
    module, prefix = proc.stdout.split()
    assert module.startswith(prefix) and "site-packages" in module


def test_its_own_tests_pass_when_installed(venv, tmp_path):
    tests = tmp_path / "tests"
    shutil.copytree(EXAMPLE / "tests", tests)
    proc = subprocess.run(
        [str(venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tests)],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "9 passed" in proc.stdout  # the plugin-registration test ran too: nothing skipped


def test_list_plugins_shows_it(venv):
    proc = run_vdm(["list-plugins", "--json"], python=venv)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert listing["conflicts"] == []  # next to vdm-rng (plugins/rng), which owns the type "rng"
    (rec,) = [r for r in listing["plugins"] if r["name"] == "rng-example"]
    assert rec["distribution"] == "vdm-rng-example"
    assert rec["version"] == "0.1.0"
    assert rec["kind"] == "device"
    assert rec["status"] == "available"
    assert rec["hooks"] == ["vdm_register_devices"]
    assert rec["module"] == "vdm_rng.plugin"
    assert rec["path"].endswith("site-packages/vdm_rng/plugin.py") and str(EXAMPLE) not in rec["path"]
    assert rec["provides"]["devices"] == ["rng-example"]
    row = parse_table(run_vdm(["list-plugins"], python=venv).stdout)["rng-example"]
    assert row == {k: rec[k] for k in ("name", "distribution", "version", "kind", "status")}



def test_device_commands_offer_its_flag(venv):
    """Commands that add devices from plugins (vhost-user, run) pick up --rng-example from the example."""
    proc = run_vdm(["--help"], python=venv)
    commands = [c for c in ("vhost-user", "run") if f"    {c} " in proc.stdout]
    if not commands:
        pytest.skip("no device-serving command is available on this machine")
    for command in commands:
        proc = run_vdm([command, "--help"], python=venv)
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())
        assert "--rng-example OPTIONS virtio-rng: random numbers for the guest's /dev/hwrng (from " \
               "os.urandom) [vdm-rng-example]; options: max_bytes=…," \
               "queue_size=16|32|64|128|256|512|1024" in text
