"""What a ``vdm`` start asks of plugins: only what the command given needs.

Availability checks of devices, hypervisors and servers and a device type's optional parts
(vdm-xen's check dlopens Xen's libraries, vdm-blk's parts() probes libnbd and librbd) are asked for
``list-plugins`` only; a plugin command's availability check and options (``add_arguments``:
vdm-xen's imports its whole dm-only module) only when that command is run or its help is shown, or
the check for ``vdm --help``'s lines -- what each prints is the same as when everything was asked at
every start. The test plugin logs each call to a file.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.core.installed import run_vdm, write_dist

LAZY = '''
import os
from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import Command, DeviceType, HypervisorType


def _log(what):
    with open(os.environ["VT_LAZY_LOG"], "a") as f:
        f.write(what + "\\n")


@dataclass
class Cfg:
    x: int = 0


def _parts():
    _log("parts")
    os.write(1, b"parts noise on fd 1\\n")
    return {"protocols": {"near": None, "far": "libfar not found"}}


def _paint_options(p):
    _log("options vt-paint")
    os.write(1, b"options noise on fd 1\\n")
    p.add_argument("--colour", required=True)


def _other_options(p):
    _log("options vt-other")
    p.add_argument("--shade", help="how dark")


def _check(what, answer=None):
    def check():
        _log(what)
        return answer
    return check


def _paint(args):
    print(args.colour)
    return 0


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-lazy-dev", config=Cfg, create=lambda c, ctx: None, parts=_parts,
                        check=_check("check vt-lazy-dev")))


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-lazy-hv", check=_check("check vt-lazy-hv", "no hv here")))


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-paint", help="paint", add_arguments=_paint_options, run=_paint,
                     available=_check("available vt-paint")))
    register(Command(name="vt-other", help="other", add_arguments=_other_options, run=lambda a: 0,
                     available=_check("available vt-other", "no frobnicator")))
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site-packages")
    write_dist(
        site, "vdmtest-lazy", "0.1", {"vt-lazy": "vdmtest_lazy.plugin"},
        {"vdmtest_lazy/__init__.py": "", "vdmtest_lazy/plugin.py": textwrap.dedent(LAZY)},
    )
    return site


def _vdm(site: Path, log: Path, *args: str):
    log.write_text("")
    proc = run_vdm(["--plugins", "vt-lazy", *args], pythonpath=[site], env={"VT_LAZY_LOG": str(log)})
    return proc, log.read_text().splitlines()


def test_a_command_asks_only_its_own_options_and_no_parts(site, tmp_path):
    proc, calls = _vdm(site, tmp_path / "log", "vt-paint", "--colour", "red")
    assert (proc.returncode, proc.stdout) == (0, "red\n"), proc.stderr
    assert calls == ["available vt-paint", "options vt-paint"]
    assert "options noise on fd 1" in proc.stderr  # plugin output while its options are added


def test_list_plugins_asks_the_parts_and_shows_them(site, tmp_path):
    proc, calls = _vdm(site, tmp_path / "log", "list-plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    record = next(r for r in json.loads(proc.stdout)["plugins"] if r["name"] == "vt-lazy")  # (stdout is JSON)
    assert record["parts"] == {
        "vt-lazy-dev": {"protocols": {"near": "available", "far": "unavailable: libfar not found"}}
    }
    assert record["availability"] == {"vt-lazy-dev": "available", "vt-lazy-hv": "unavailable: no hv here"}
    assert record["status"] == (
        "available (unavailable vt-lazy-hv: no hv here; far: unavailable: libfar not found)"
    )
    assert calls == ["check vt-lazy-dev", "parts", "check vt-lazy-hv"]
    assert "parts noise on fd 1" in proc.stderr


def test_another_commands_help_and_errors_still_show_its_options(site, tmp_path):
    proc, calls = _vdm(site, tmp_path / "log", "vt-other", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--shade SHADE" in proc.stdout and "how dark" in proc.stdout
    assert "Unavailable here: no frobnicator" in proc.stdout
    assert calls == ["available vt-other", "options vt-other"]
    proc, calls = _vdm(site, tmp_path / "log", "vt-other", "--shade", "3")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "vdm: vt-other is provided by vdmtest-lazy, which is unavailable here: no frobnicator"
    ]
    proc, calls = _vdm(site, tmp_path / "log", "vt-paint")  # its required option missing
    assert proc.returncode == 2
    assert "the following arguments are required: --colour" in proc.stderr
    assert calls == ["available vt-paint", "options vt-paint"]


@pytest.mark.parametrize("args", [("--help",), ("-h", "vt-paint")])
def test_vdms_help_asks_every_commands_check_and_no_options(site, tmp_path, args):
    proc, calls = _vdm(site, tmp_path / "log", *args)
    assert proc.returncode == 0, proc.stderr
    lines = [" ".join(ln.split()) for ln in proc.stdout.splitlines()]
    assert "vt-other (unavailable here) other" in lines and "vt-paint paint [vdmtest-lazy]" in lines
    assert calls == ["available vt-other", "available vt-paint"]


def test_global_options_before_the_command_do_not_hide_it(site, tmp_path):
    proc, calls = _vdm(site, tmp_path / "log", "-v", "--plugin-timeout", "30", "vt-paint", "--colour", "blue")
    assert (proc.returncode, proc.stdout) == (0, "blue\n"), proc.stderr
    assert calls == ["available vt-paint", "options vt-paint"]
