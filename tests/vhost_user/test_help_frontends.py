"""``vdm vhost-user --help`` and the READMEs name the frontends that are tested, and no other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vdm_lab
from vdm_lab import debian13

REPO = Path(__file__).resolve().parents[2]
UNTESTED = ("cloud-hypervisor", "crosvm")


def test_help_names_the_tested_qemus_and_no_untested_frontend():
    r = subprocess.run([sys.executable, "-m", "vdm.cli.main", "vhost-user", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "QEMU 7.2 and 10.0" in r.stdout, r.stdout
    for name in UNTESTED:
        assert name not in r.stdout
    top = subprocess.run([sys.executable, "-m", "vdm.cli.main", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    for name in UNTESTED:
        assert name not in top


def test_the_plugin_readme_lists_the_versions_the_tests_run():
    """The versions in the table are the ones installed here (the host's, the Debian 13 root's)."""
    text = (REPO / "plugins" / "vhost-user" / "README.md").read_text()
    table = text[text.index("## Tested frontends"):]
    host = vdm_lab.host_qemu()
    if host is not None:
        assert f"| QEMU | {host.version} |" in table and f"[{host.name}]" in table
    root = debian13.root_dir()
    info = root / ".vdm-debian13.txt"
    if info.exists():  # built already (the real-guest tests build it; this test does not)
        version = dict(ln.split("=", 1) for ln in info.read_text().splitlines() if "=" in ln)["qemu_version"]
        assert f"| QEMU | {version} |" in table
    assert "[qemu10.0]" in table
    for name in UNTESTED:
        assert name not in text
