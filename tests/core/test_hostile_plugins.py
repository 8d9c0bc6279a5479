"""A plugin cannot take vdm down: each hostile plugin fails alone, by name, in one line.

Every plugin here is a real installed distribution (a dist-info directory on the ``PYTHONPATH`` of a
``python -m vdm.cli.main`` subprocess, see :mod:`tests.core.installed`) loaded next to a good one
(``vt-good``, whose ``vdm vt-show`` prints the device table) and next to the in-tree ``blk`` and
``vhost-user`` plugins. For each, the real ``vdm`` command must: still run the good plugin's
command, print exactly one stderr line naming the hostile plugin and its distribution, never print a
traceback, and keep ``list-plugins --json`` valid JSON with the plugin marked failed.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.core.installed import run_vdm, write_dist
from tests.core.test_plugins import GOOD

HEAD = '''
from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import Command, DeviceType, HypervisorType


@dataclass
class Cfg:
    path: str = ""
'''

HOSTILE = {
    # name: (plugin body after HEAD, what its failure line must say)
    "register-42": ('''
@hookimpl
def vdm_register_devices(register):
    register(42)
''', "registered int 42, not a DeviceType"),
    "register-none": ('''
@hookimpl
def vdm_register_hypervisors(register):
    register(None)
''', "registered NoneType None, not a HypervisorType"),
    "nameless-command": ('''
@hookimpl
def vdm_register_commands(register):
    register(Command(name=None, help="x", add_arguments=lambda p: None, run=lambda a: 0))
''', "name None is not a short name"),
    "check-42": ('''
@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-hv-42", check=lambda: 42))
''', "availability check returned int, not None or a reason"),
    "not-dataclass": ('''
class Plain:
    path = ""


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-plain", config=Plain, create=lambda c, ctx: None, cli_flag="--vt-plain"))
''', "config Plain is not a dataclass (decorate it with @dataclass)"),
    "flag-no-dashes": ('''
@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-nodash", config=Cfg, create=lambda c, ctx: None, cli_flag="vt-nodash"))
''', "cli_flag 'vt-nodash' must look like --name"),
    "positional-not-a-field": ('''
@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-pos", config=Cfg, create=lambda c, ctx: None, positional="file"))
''', "positional 'file' is not a field of Cfg"),
    "hangs-at-import": ('''
import time

time.sleep(3600)
''', "import failed: did not answer within 2 s"),
    "hangs-in-check": ('''
import time


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-hv-slow", check=lambda: time.sleep(3600)))
''', "availability check failed: did not answer within 2 s"),
    "ctrl-c-at-import": ('''
raise KeyboardInterrupt
''', "import failed: KeyboardInterrupt"),
    "bad-str": ('''
class Weird(Exception):
    def __str__(self):
        raise RuntimeError("no message for you")


@hookimpl
def vdm_register_devices(register):
    raise Weird()
''', "vdm_register_devices raised Weird: (its message cannot be shown)"),
    "choices-not-tuple": ('''
from dataclasses import field


@dataclass
class Picky:
    mode: str = field(default="a", metadata={"choices": 5})


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-picky", config=Picky, create=lambda c, ctx: None, cli_flag="--vt-picky"))
''', "field mode: choices must be a tuple of values"),
}

#: plugins that load, but whose command options or help text used to break other commands
AWKWARD = {
    "options-hang": '''
import time


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-options-hang", help="x", add_arguments=lambda p: time.sleep(3600),
                     run=lambda a: 0))
''',
    "options-exit": '''
import sys


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-options-exit", help="x", add_arguments=lambda p: sys.exit(4), run=lambda a: 0))
''',
    "percent-help": '''
@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-pct", config=Cfg, create=lambda c, ctx: None, cli_flag="--vt-pct",
                        help="100% x"))


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-pct-cmd", help="50% faster", add_arguments=lambda p: None, run=lambda a: 0))
''',
    "odd-status": '''
@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-odd-status", help="x", add_arguments=lambda p: None, run=lambda a: "done"))
''',
    "same-flag": '''
@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-disk2", config=Cfg, create=lambda c, ctx: None, cli_flag="--disk",
                        help="a second --disk"))
''',
}

#: plugins whose only fault is a broken availability check: loaded, and unavailable for that reason
UNAVAILABLE = ("check-42", "hangs-in-check")

#: the plugin-code time bound these tests use (seconds): the hanging plugins are reported after it
TIMEOUT = "2"


def _dist(name: str) -> str:
    return f"vdmtest-{name}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("hostile-site")
    write_dist(site, "vdmtest-good", "1.2.3", {"vt-good": "vdmtest_good.plugin"},
               {"vdmtest_good/__init__.py": "", "vdmtest_good/plugin.py": textwrap.dedent(GOOD)})
    for name, (body, _) in HOSTILE.items():
        pkg = "vdmtest_" + name.replace("-", "_")
        write_dist(site, _dist(name), "0.1", {f"vt-{name}": f"{pkg}.plugin"},
                   {f"{pkg}/__init__.py": "", f"{pkg}/plugin.py": HEAD + textwrap.dedent(body)})
    for name, body in AWKWARD.items():
        pkg = "vdmtest_" + name.replace("-", "_")
        write_dist(site, _dist(name), "0.1", {f"vt-{name}": f"{pkg}.plugin"},
                   {f"{pkg}/__init__.py": "", f"{pkg}/plugin.py": HEAD + textwrap.dedent(body)})
    # prints at import: must not reach stdout (list-plugins --json stays JSON), but it loads
    write_dist(site, "vdmtest-chatty", "0.1", {"vt-chatty": "vdmtest_chatty.plugin"},
               {"vdmtest_chatty/__init__.py": "",
                "vdmtest_chatty/plugin.py": "import os\nprint('hello from chatty')\n"
                                            "os.system('echo chatty-shell')\n" + HEAD})
    return site


def _vdm(site: Path, *args: str, plugins: str):
    return run_vdm(["--plugins", plugins, *args], pythonpath=[site], env={"VDM_PLUGIN_TIMEOUT": TIMEOUT})


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_plugin_fails_alone_in_one_line(site, name):
    proc = _vdm(site, "vt-show", plugins=f"vt-good,vt-{name}")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "device vt-gadget from vdmtest-good: a test gadget" in proc.stdout
    lines = proc.stderr.splitlines()
    expected = HOSTILE[name][1]
    if name in UNAVAILABLE:  # the plugin loads, its hypervisor is unavailable: nothing on stderr
        assert lines == []
    else:
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"vdm: plugin vt-{name} ({_dist(name)} 0.1) failed: "), lines[0]
        assert expected in lines[0]
    # --strict refuses to run with it (except the merely unavailable one)
    strict = _vdm(site, "--strict", "vt-show", plugins=f"vt-good,vt-{name}")
    assert strict.returncode == (0 if name in UNAVAILABLE else 1)
    assert "Traceback" not in strict.stderr


def test_list_plugins_with_every_hostile_plugin(site):
    every = ",".join(["vt-good", "vt-chatty", *(f"vt-{n}" for n in HOSTILE)])
    proc = _vdm(site, "list-plugins", "--json", plugins=every)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)["plugins"]}  # stdout is JSON, only JSON
    assert records["vt-good"]["status"] == "available"
    assert records["vt-chatty"]["status"] == "unavailable: provides nothing"
    assert "hello from chatty" in proc.stderr and "chatty-shell" in proc.stderr
    for name, (_, expected) in HOSTILE.items():
        r = records[f"vt-{name}"]
        assert r["distribution"] == _dist(name)
        assert expected in r["status"], r["status"]
        if name in UNAVAILABLE:
            assert r["status"].startswith("unavailable: ")
        else:
            assert r["status"].startswith("failed: ")
            assert r["provides"] == {"devices": [], "hypervisors": [], "servers": [], "commands": []}


def test_device_plugins_with_bad_options_do_not_disable_vhost_user(site):
    """A bad device type used to break ``vdm vhost-user`` for every device ("its options are broken")."""
    proc = _vdm(site, "vhost-user", "--help", plugins="blk,vhost-user,vt-not-dataclass,vt-flag-no-dashes")
    assert proc.returncode == 0, proc.stderr
    assert "--disk" in proc.stdout and "--socket-path" in proc.stdout
    assert "vt-plain" not in proc.stdout and "vt-nodash" not in proc.stdout
    assert "Traceback" not in proc.stderr
    # and it runs: here as far as refusing a socket folder that does not exist (one line)
    proc = _vdm(site, "vhost-user", "-s", "/nonexistent/s.sock", "--disk", "/dev/null",
                plugins="blk,vhost-user,vt-not-dataclass,vt-flag-no-dashes")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "vdm: plugin vt-flag-no-dashes (vdmtest-flag-no-dashes 0.1) failed: vdm_register_devices "
        "DeviceType vt-nodash: cli_flag 'vt-nodash' must look like --name",
        "vdm: plugin vt-not-dataclass (vdmtest-not-dataclass 0.1) failed: vdm_register_devices "
        "DeviceType vt-plain: config Plain is not a dataclass (decorate it with @dataclass)",
        "vdm: --socket-path /nonexistent/s.sock: no such folder /nonexistent",
    ]


def test_plugin_timeout_option_beats_the_environment(site):
    proc = run_vdm(["--plugin-timeout", "1", "--plugins", "vt-good,vt-hangs-at-import", "vt-show"],
                   pythonpath=[site], env={"VDM_PLUGIN_TIMEOUT": "3600"})
    assert proc.returncode == 0
    assert "import failed: did not answer within 1 s" in proc.stderr


@pytest.mark.parametrize("value", ["0", "soon", "-3"])
def test_bad_timeout_is_one_line(site, value):
    proc = run_vdm(["--plugins", "vt-good", "vt-show"], pythonpath=[site], env={"VDM_PLUGIN_TIMEOUT": value})
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"vdm: VDM_PLUGIN_TIMEOUT={value!r}: give a number of seconds greater than 0"
    ]


@pytest.mark.parametrize("name", ["options-hang", "options-exit"])
def test_command_whose_options_hang_or_exit_is_unavailable_alone(site, name):
    plugins = f"vt-good,vt-{name}"
    proc = _vdm(site, "vt-show", plugins=plugins)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "device vt-gadget from vdmtest-good: a test gadget" in proc.stdout
    proc = _vdm(site, f"vt-{name}", plugins=plugins)
    assert proc.returncode == 1
    why = "did not answer within 2 s" if name == "options-hang" else "SystemExit: 4"
    assert proc.stderr.splitlines() == [
        f"vdm: vt-{name} is provided by {_dist(name)}, which is unavailable here: its options are broken "
        f"({why}" + (" (see --plugin-timeout))" if name == "options-hang" else ")")
    ]


def test_percent_in_a_plugin_help_is_text(site):
    plugins = "blk,vhost-user,vt-good,vt-percent-help"
    top = _vdm(site, "--help", plugins=plugins)
    assert top.returncode == 0 and "Traceback" not in top.stderr, top.stderr
    assert "50% faster [vdmtest-percent-help]" in top.stdout
    sub = _vdm(site, "vhost-user", "--help", plugins=plugins)
    assert sub.returncode == 0 and "Traceback" not in sub.stderr, sub.stderr
    assert "100% x [vdmtest-percent-help]" in " ".join(sub.stdout.split())


def test_a_second_plugin_with_the_same_flag_does_not_break_the_command(site):
    """Two device types with ``--disk``: the one whose name sorts first keeps it, the command works."""
    proc = _vdm(site, "vhost-user", "--help", plugins="blk,vhost-user,vt-same-flag")
    assert proc.returncode == 0, proc.stderr
    assert "virtio-blk disk: raw file, block device or qcow2 image [vdm-blk]" in " ".join(proc.stdout.split())
    assert "a second --disk [vdmtest-same-flag]; options" not in " ".join(proc.stdout.split())
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def corrupt_site(tmp_path_factory) -> Path:
    """The good plugin next to distributions whose metadata files are corrupt."""
    site = tmp_path_factory.mktemp("corrupt-site")
    write_dist(site, "vdmtest-good", "1.2.3", {"vt-good": "vdmtest_good.plugin"},
               {"vdmtest_good/__init__.py": "", "vdmtest_good/plugin.py": textwrap.dedent(GOOD)})
    info = write_dist(site, "vdmtest-badmeta", "0.1", {"vt-badmeta": "vdmtest_badmeta.plugin"},
                      {"vdmtest_badmeta/__init__.py": "", "vdmtest_badmeta/plugin.py": HEAD})
    (info / "METADATA").write_bytes(b"Metadata-Version: 2.1\nName: vdmtest-\xff\xfe\nVersion: 0.1\n")
    info = write_dist(site, "vdmtest-badep", "0.1", {"vt-badep": "vdmtest_badep.plugin"},
                      {"vdmtest_badep/__init__.py": "", "vdmtest_badep/plugin.py": HEAD})
    (info / "entry_points.txt").write_text("[vdm.plugins]\nthis line is not an entry point\n")
    info = write_dist(site, "other-tool", "0.1", {}, {"other_tool/__init__.py": ""})
    (info / "entry_points.txt").write_text("[console_scripts]\nnot an entry point either\n")
    return site


def test_corrupt_distribution_metadata_fails_that_plugin_alone(corrupt_site):
    """One corrupt entry_points.txt anywhere used to make importlib's entry_points() -- and so every
    vdm command -- raise; corrupt METADATA did the same through the distribution's name."""
    proc = run_vdm(["--plugins", "vt-good,vt-badmeta", "vt-show"], pythonpath=[corrupt_site])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0
    assert "device vt-gadget from vdmtest-good: a test gadget" in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("vdm: plugin vdmtest-badep (vdmtest-badep ?) failed: its entry_points.txt "
                               "cannot be read (")
    assert lines[1].startswith("vdm: plugin vt-badmeta (? ?) failed: its distribution's METADATA cannot be "
                               "read (UnicodeDecodeError: ")
    listing = run_vdm(["list-plugins", "--json"], pythonpath=[corrupt_site])
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    status = {r["name"]: r["status"] for r in json.loads(listing.stdout)["plugins"]}
    assert status["vt-good"] == "available"
    assert status["vdmtest-badep"].startswith("failed: its entry_points.txt cannot be read")
    assert "other-tool" not in status and "other_tool" not in status  # not a vdm plugin: not listed


def test_command_returning_something_odd_is_one_line(site):
    proc = _vdm(site, "vt-odd-status", plugins="vt-odd-status")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "vdm: vt-odd-status (vdmtest-odd-status) returned str, not an exit status"
    ]
