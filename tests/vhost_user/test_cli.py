"""``vdm vhost-user`` as a user runs it, and the core's device-option helper it is built on."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest
from vdm.cli.devices import add_device_options, device_configs, devices_epilog
from vdm.errors import UserError
from vdm.plugins import load_plugins
from vdm_blk.config import BlkConfig

from tests.vhost_user.frontend import Frontend
from tests.vhost_user.vdmproc import VdmProcess

VDM = [sys.executable, "-m", "vdm.cli.main"]


def _vdm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VDM, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def test_help_lists_the_devices_plugins_provide(plugins):
    r = _vdm("vhost-user", "--help")
    assert r.returncode == 0, r.stderr
    for dt, info in plugins.devices.values():
        if dt.cli_flag:
            assert dt.cli_flag in r.stdout
        assert dt.name in r.stdout and info.distribution in r.stdout
    assert "--socket-path" in r.stdout
    top = _vdm("--help")
    assert "vhost-user" in top.stdout


def test_serves_a_disk_and_sigterm_removes_the_socket(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(b"\x5a" * 4096 + bytes(1 << 20))
    sock = str(tmp_path / "s.sock")
    vdm = VdmProcess(sock, "--disk", f"{image},ro")
    try:
        fe = Frontend(sock)
        fe.start()
        u = fe.request(0, [b"\0" * 16], [512, 1])  # read sector 0
        assert u.data[:512] == b"\x5a" * 512 and u.data[-1] == 0
        fe.close()
        fe.ram.close()
    finally:
        assert vdm.stop() == 0, vdm.output
    assert not os.path.exists(sock)


def test_sigusr1_prints_every_threads_stack_and_vdm_carries_on(tmp_path):
    """What README.md tells a user to do with a vdm that seems stuck."""
    import signal
    import time

    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    sock = str(tmp_path / "s.sock")
    vdm = VdmProcess(sock, "--disk", str(image))
    try:
        vdm.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while vdm.count("most recent call first") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vdm.count("most recent call first") >= 1, vdm.output
        assert vdm.count("Current thread") + vdm.count("Thread 0x") >= 1, vdm.output
        assert "vdm/cli/main.py" in vdm.output or "vdm_vhost_user" in vdm.output, vdm.output
        assert vdm.alive
    finally:
        assert vdm.stop() == 0, vdm.output


def test_device_from_a_toml_file_with_a_relative_path(tmp_path):
    (tmp_path / "d.img").write_bytes(bytes(1 << 20))
    (tmp_path / "dev.toml").write_text('[[disk]]\npath = "d.img"\n')
    sock = str(tmp_path / "s.sock")
    other = tmp_path / "elsewhere"
    other.mkdir()
    p = subprocess.Popen(
        [*VDM, "vhost-user", "--socket-path", sock, str(tmp_path / "dev.toml")],
        cwd=other,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert b"serving virtio-blk" in p.stdout.readline()
    finally:
        p.terminate()
        assert p.wait(20) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one device"),
        (["--disk", "a.img", "--disk", "b.img"], "exactly one device"),
        (["--disk", "a.img,bogus"], "unknown option 'bogus'"),
        (["--disk", "/nonexistent/x.img"], "no such file"),
        (["--console", "serial"], "needs a hypervisor with port I/O"),
    ],
)
def test_wrong_device_options_are_one_clear_line(tmp_path, args, message):
    r = _vdm("vhost-user", "--socket-path", str(tmp_path / "s.sock"), *args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: what SIGKILL leaves
    vdm = VdmProcess(str(stale), "--disk", str(image))
    try:
        other = tmp_path / "e.img"
        other.write_bytes(bytes(1 << 20))
        r = _vdm("vhost-user", "--socket-path", str(stale), "--disk", str(other))
        assert r.returncode == 1 and "another process is listening" in r.stderr
    finally:
        assert vdm.stop() == 0
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    r = _vdm("vhost-user", "--socket-path", str(plain), "--disk", str(image))
    assert r.returncode == 1 and "not a socket" in r.stderr
    assert plain.read_text() == "keep me"


# ---- vdm.cli.devices ----------------------------------------------------------------------------


def _parser(plugins) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("-s", "--socket-path")
    add_device_options(p, plugins)
    return p


def test_options_and_toml_tables_become_configs(plugins, tmp_path):
    p = _parser(plugins)
    args = p.parse_args(["-d", "x.img,ro,queues=2", "--disk", "y.img"])
    configs = device_configs(args, plugins)
    assert [(dt.name, c) for dt, c in configs] == [
        ("blk", BlkConfig(path="x.img", ro=True, queues=2)),
        ("blk", BlkConfig(path="y.img")),
    ]
    doc = {"disk": {"path": "z.img", "cache": "none"}}
    ((_, cfg),) = device_configs(p.parse_args([]), plugins, doc, base_dir=str(tmp_path))
    assert cfg == BlkConfig(path=str(tmp_path / "z.img"), cache="none")
    # the command line replaces the file's devices of the same type
    assert [c.path for _, c in device_configs(p.parse_args(["-d", "w.img"]), plugins, doc)] == ["w.img"]


def test_bad_tables_and_options_are_user_errors(plugins):
    p = _parser(plugins)
    with pytest.raises(UserError, match="cache"):
        device_configs(p.parse_args(["-d", "x.img,cache=sometimes"]), plugins)
    with pytest.raises(UserError, match="table"):
        device_configs(p.parse_args([]), plugins, {"disk": "x.img"})
    with pytest.raises(UserError, match="missing option path"):
        device_configs(p.parse_args([]), plugins, {"disk": [{"ro": True}]})


def test_a_flag_the_command_already_has_is_not_added_twice(plugins):
    p = argparse.ArgumentParser()
    p.add_argument("-d", "--disk", help="the command's own")
    add_device_options(p, plugins)  # must not raise argparse's conflict error
    assert "blk" in devices_epilog(plugins)
    assert devices_epilog(None) == "No device plugins are installed."
