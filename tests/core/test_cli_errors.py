"""Bad user input to ``vdm`` is one clear line on stderr, never a traceback or a hang.

Each case runs the real ``vdm`` command (``python -m vdm.cli.main``) with the in-tree plugins, as a
user would, and checks its exit status and stderr. A hang shows as the subprocess timeout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.core.installed import run_vdm

#: only what these tests use: the blk device and the vhost-user command
ENV = {"VDM_PLUGINS": "blk,vhost-user"}


def _one_line(proc, *parts: str) -> str:
    """The single stderr line; it must contain every part and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    return img


def _toml(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "dev.toml"
    if case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b'[disk]\npath = "\xff\xfe.img"\n')
    elif case == "nested":
        path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    elif case == "fifo":
        os.mkfifo(path)  # nobody ever writes: opening it for reading the usual way blocks for good
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("directory", "is a directory, not a TOML file"),
        ("not-utf8", "not UTF-8 text"),
        ("nested", "nested too deeply"),
        ("fifo", "is a FIFO, not a TOML file"),
    ],
)
def test_bad_device_file_is_one_line(tmp_path, case, expected):
    path = _toml(tmp_path, case)
    proc = run_vdm(["vhost-user", "-s", str(tmp_path / "s.sock"), str(path)], env=ENV)
    assert proc.returncode == 1, proc.stderr
    _one_line(proc, str(path), expected)
    assert not (tmp_path / "s.sock").exists()


def test_empty_socket_path_is_refused_before_the_device_opens(disk, tmp_path):
    proc = run_vdm(["vhost-user", "-s", "", "--disk", str(disk)], env=ENV)
    assert proc.returncode == 1, proc.stderr
    _one_line(proc, "--socket-path", "empty")


def test_socket_in_a_missing_folder_is_refused(disk, tmp_path):
    sock = tmp_path / "no-such-dir" / "s.sock"
    proc = run_vdm(["vhost-user", "-s", str(sock), "--disk", str(disk)], env=ENV)
    assert proc.returncode == 1, proc.stderr
    _one_line(proc, str(sock.parent), "no such folder")


def test_unknown_table_is_an_error_under_strict(disk, tmp_path):
    dev = tmp_path / "dev.toml"
    dev.write_text(f'[disk]\npath = "{disk}"\n\n[diks]\npath = "other.img"\n')
    proc = run_vdm(["--strict", "vhost-user", "-s", str(tmp_path / "s.sock"), str(dev)], env=ENV)
    assert proc.returncode == 1, proc.stderr
    _one_line(proc, "[diks]", "unknown table", "[disk]")
    assert not (tmp_path / "s.sock").exists()


def test_unknown_table_is_a_warning_otherwise(disk, tmp_path):
    from tests.vhost_user.vdmproc import VdmProcess

    dev = tmp_path / "dev.toml"
    dev.write_text(f'[disk]\npath = "{disk}"\n\n[[diks]]\npath = "other.img"\n')
    vdm = VdmProcess(str(tmp_path / "s.sock"), str(dev))
    try:
        assert vdm.alive
    finally:
        assert vdm.stop() == 0
    warnings = [ln for ln in vdm.lines if "unknown table" in ln]
    assert len(warnings) == 1 and "[diks]" in warnings[0] and "ignored" in warnings[0], vdm.output
    assert "Traceback" not in vdm.output


@pytest.mark.parametrize("how", ["option", "environment"])
def test_plugin_name_nobody_has_is_reported(how):
    args, env = (["--plugins", "nope,blk"], {}) if how == "option" else ([], {"VDM_PLUGINS": "nope,blk"})
    proc = run_vdm([*args, "list-plugins"], env=env)
    assert proc.returncode == 0
    line = _one_line(proc, "'nope'", "--plugins" if how == "option" else "VDM_PLUGINS")
    assert "blk" in line  # says which names there are
    strict = run_vdm(["--strict", *args, "list-plugins"], env=env)
    assert strict.returncode == 1
    _one_line(strict, "'nope'")


def test_good_toml_still_works(disk, tmp_path):
    """The checks above do not refuse an ordinary file (a symlink to it included)."""
    from tests.vhost_user.vdmproc import VdmProcess

    dev = tmp_path / "real.toml"
    dev.write_text(f'[disk]\npath = "{disk}"\nro = true\n')
    link = tmp_path / "dev.toml"
    link.symlink_to(dev)
    vdm = VdmProcess(str(tmp_path / "s.sock"), str(link))
    try:
        assert vdm.alive
    finally:
        assert vdm.stop() == 0
    assert not any("warning" in ln or "Traceback" in ln for ln in vdm.lines), vdm.output


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="vdm vhost-user runs on Linux only")


def test_unavailable_dm_only_still_explains_itself(tmp_path: Path):
    """Issue 19 item 12, with the real vdm-xen made unavailable (its libraries looked for in an
    empty directory, ``VDM_XEN_LIBDIR``): ``vdm --help`` marks it, ``vdm dm-only --help`` shows
    every option and the reason, and running it says why in one line whatever its arguments."""
    env = {"VDM_PLUGINS": "xen,blk", "VDM_XEN_LIBDIR": str(tmp_path), "COLUMNS": "200"}
    top = run_vdm(["--help"], env=env)
    assert top.returncode == 0
    assert "dm-only             (unavailable here) serve virtio-mmio devices" in top.stdout
    usage = run_vdm(["dm-only", "--help"], env=env)
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: vdm dm-only [-h]")
    for option in ("--domid", "--irq-kind", "--wait-timeout"):
        assert option in usage.stdout
    assert "Unavailable here: Xen libraries not installed" in usage.stdout
    for argv in (["dm-only"], ["dm-only", "--domid", "nonsense", "--what"]):
        line = _one_line(run_vdm(argv, env=env), "dm-only is provided by vdm-xen", "unavailable here")
        assert "Xen libraries not installed" in line
