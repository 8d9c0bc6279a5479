"""The Debian 13 root (scripts/debian13): its programs see the host paths they are given, at the same
paths, including files made there after they started, and leave no mount behind on the host."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from vdm_lab import debian13


@pytest.fixture(scope="module")
def root() -> debian13.Debian13Root:
    try:
        return debian13.build()
    except debian13.Debian13Error as e:
        pytest.skip(f"the Debian 13 root cannot be built here: {e}")


def _host_mounts(root: debian13.Debian13Root) -> list[str]:
    return [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if str(root.dir) in ln]


def test_its_qemu_is_10_and_libblkio_1_5(root: debian13.Debian13Root) -> None:
    assert root.qemu_version.startswith("10.0."), root.info
    assert root.info["libblkio1"].startswith("1.5"), root.info
    p = root.run(["qemu-system-x86_64", "--version"])
    assert p.returncode == 0 and f"version {root.qemu_version}" in p.stdout, p.stdout + p.stderr
    p = root.run(["sh", "-c", "test -f /usr/include/blkio.h && command -v gcc"])
    assert p.returncode == 0, p.stdout + p.stderr


def test_host_paths_are_seen_at_the_same_path_and_nothing_stays_mounted(
        root: debian13.Debian13Root, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "before").write_text("made before\n")
    lone = tmp_path / "lone.txt"
    lone.write_text("a file alone\n")
    # inside: read what is there, then wait for a file the host makes after the start, then write one
    script = ("cat before; cat " + str(lone) + "; while [ ! -e later ]; do sleep 0.05; done; cat later; "
              "echo from-debian13 >made-inside; grep -c ^VERSION_CODENAME=trixie /etc/os-release")
    proc = subprocess.Popen(root.command(["sh", "-c", script], visible=[shared, lone], cwd=shared),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.3)
    (shared / "later").write_text("made later\n")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert out.split() == ["made", "before", "a", "file", "alone", "made", "later", "1"], out
    assert (shared / "made-inside").read_text() == "from-debian13\n"
    assert _host_mounts(root) == []


def test_a_relative_or_missing_path_is_refused(root: debian13.Debian13Root, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must exist and be absolute"):
        root.command(["true"], visible=[tmp_path / "missing"])
    p = subprocess.run([str(debian13.ENTER_SCRIPT), str(root.dir), "relative", "--", "/", "true"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "must be absolute" in p.stderr
