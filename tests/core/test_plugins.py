"""Plugin discovery end to end: small distributions installed for real, ``vdm`` run as a user would.

Each test plugin is a distribution with its own dist-info directory (see :mod:`tests.core.installed`)
on the ``PYTHONPATH`` of a ``python -m vdm.cli.main`` subprocess, next to whatever vdm plugins this
machine has installed (the in-tree ones). The tests look only at their own plugins (names ``vt-*``)
unless they restrict loading with ``VDM_PLUGINS`` / ``--plugins``.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import vdm

from tests.core.installed import list_plugins_json, parse_table, run_vdm, write_dist

GOOD = '''
"""A plugin that works: a device, a hypervisor and a command that reports what won."""
from __future__ import annotations

from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import Command, DeviceType, HypervisorType

VDM_API = 2


@dataclass
class GoodConfig:
    path: str = ""


def _show(args):
    for name, (dt, info) in sorted(args.plugin_set.devices.items()):
        print(f"device {name} from {info.distribution}: {dt.help}")
    return 0


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-gadget", config=GoodConfig, create=lambda c, ctx: None,
                        cli_flag="--vt-gadget", help="a test gadget"))


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-hv", check=lambda: None, help="a test hypervisor"))


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-show", help="print the device table", add_arguments=lambda p: None,
                     run=_show))
'''

IMPORT_FAILS = '''
import vdm_no_such_dependency  # noqa: F401
'''

UNKNOWN_HOOK = '''
from vdm import hookimpl


@hookimpl
def vdm_register_gizmos(register):
    register("gizmo")
'''

HOOK_RAISES = '''
from vdm import hookimpl
from vdm.registry import HypervisorType


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-never", check=lambda: None))
    raise RuntimeError("boom")
'''

WRONG_API = '''
from vdm import hookimpl

VDM_API = 99


@hookimpl
def vdm_register_devices(register):
    raise AssertionError("must not be called")
'''

BAD_ARGS = '''
from vdm import hookimpl


@hookimpl
def vdm_register_devices(register, colour):
    pass
'''

UNAVAILABLE = '''
from vdm import hookimpl
from vdm.registry import HypervisorType


def _explode():
    raise OSError("probe exploded")


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-hv-missing", check=lambda: "needs /dev/vt-nothing"))
    register(HypervisorType(name="vt-hv-broken", check=_explode))
'''

SPECNAME = '''
"""Hook implementations under names of their own (pluggy's specname): found through pluggy."""
from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import DeviceType, ServerType

VDM_API = 2


@dataclass
class Cfg:
    x: int = 0


@hookimpl(specname="vdm_register_devices")
def my_devices(register):
    register(DeviceType(name="vt-spec-dev", config=Cfg, create=lambda c, ctx: None))


@hookimpl(specname="vdm_register_servers")
def my_servers(register):
    register(ServerType(name="vt-spec-server", check=lambda: None, help="serves over a socket"))
'''

API1_SERVER = '''
"""An API-1 plugin that lists a way of serving devices as a hypervisor (what vhost-user did)."""
from vdm import hookimpl
from vdm.registry import HypervisorType

VDM_API = 1


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-old-server", check=lambda: None, help="no VMM hooks"))
'''

COMMANDS = '''
"""Two commands with options: one that cannot run here, one that reads the plugin set."""
import warnings

from vdm import hookimpl
from vdm.registry import Command

VDM_API = 2


def _away_options(parser):
    parser.add_argument("--speed", type=int, help="how fast to go")
    parser.add_argument("target", help="where to go")


def _here_options(parser):
    plugins = parser.get_default("plugin_set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = parser.vdm_plugins  # the API-1 way: still works, and warns
    assert old is plugins and plugins is not None
    (w,) = caught
    seen = f"{len(plugins.devices)} device types; {w.category.__name__}: {w.message}"
    parser.add_argument("--seen", default=seen)


def _here_run(args):
    print(args.seen)
    print("plugin_set" if args.plugin_set.commands["vt-here"] else "")
    return 0


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-away", help="go away", add_arguments=_away_options, run=lambda a: 0,
                     available=lambda: "needs /dev/vt-away"))
    register(Command(name="vt-here", help="stay", add_arguments=_here_options, run=_here_run))
    register(Command(name="vt-gone", help="needs a library", add_arguments=_needs_library, run=lambda a: 0,
                     available=lambda: "libgone not installed"))


def _needs_library(parser):
    import vdmtest_libgone  # noqa: F401  (not installed here: what the check already said)
'''

BAD_SERVER = '''
from vdm import hookimpl
from vdm.registry import ServerType

VDM_API = 2


@hookimpl
def vdm_register_servers(register):
    register(ServerType(name="vt-good-server", check=lambda: None))
    register(ServerType(name="vt-bad-server", check=42))
'''

PARTIAL = '''
from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import DeviceType, HypervisorType


@dataclass
class Cfg:
    x: int = 0


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-partial-dev", config=Cfg, create=lambda c, ctx: None,
                        check=lambda: "needs a licence"))


@hookimpl
def vdm_register_hypervisors(register):
    register(HypervisorType(name="vt-partial-hv", check=lambda: None))
'''

PARTS = '''
from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import DeviceType


@dataclass
class Cfg:
    x: int = 0


def _parts():
    return {"protocols": {"local": None, "remote": "libremote not found (apt install libremote1)"}}


def _parts_raise():
    raise OSError("probe exploded")


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-parts-dev", config=Cfg, create=lambda c, ctx: None, parts=_parts))
    register(DeviceType(name="vt-parts-bad", config=Cfg, create=lambda c, ctx: None, parts=_parts_raise))
    register(DeviceType(name="vt-parts-junk", config=Cfg, create=lambda c, ctx: None, parts=lambda: [1]))
'''

EXITS = '''
import sys

sys.exit(3)
'''

CLASHING_COMMAND = '''
from vdm import hookimpl
from vdm.registry import Command


@hookimpl
def vdm_register_commands(register):
    register(Command(name="list-plugins", help="mine", add_arguments=lambda p: None, run=lambda a: 7))
'''

FRAGILE_COMMANDS = '''
from vdm import hookimpl
from vdm.registry import Command


def _broken_check():
    raise OSError("probe exploded")


def _broken_options(parser):
    parser.add_argument("--x")
    parser.add_argument("--x")  # argparse refuses a second --x


@hookimpl
def vdm_register_commands(register):
    register(Command(name="vt-probe", help="check raises", add_arguments=lambda p: None,
                     run=lambda a: 0, available=_broken_check))
    register(Command(name="vt-opts", help="options raise", add_arguments=_broken_options, run=lambda a: 0))
'''


def _dup(which: str) -> str:
    return f'''
from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import DeviceType


@dataclass
class Cfg:
    x: int = 0


@hookimpl
def vdm_register_devices(register):
    register(DeviceType(name="vt-dup", config=Cfg, create=lambda c, ctx: None, help="made by {which}"))
'''


PLUGINS = {
    # entry point: (distribution, version, package, source)
    "vt-good": ("vdmtest-good", "1.2.3", "vdmtest_good", GOOD),
    "vt-importfail": ("vdmtest-importfail", "0.1", "vdmtest_importfail", IMPORT_FAILS),
    "vt-unknownhook": ("vdmtest-unknownhook", "0.1", "vdmtest_unknownhook", UNKNOWN_HOOK),
    "vt-raises": ("vdmtest-raises", "0.1", "vdmtest_raises", HOOK_RAISES),
    "vt-oldapi": ("vdmtest-oldapi", "2.0", "vdmtest_oldapi", WRONG_API),
    "vt-badargs": ("vdmtest-badargs", "0.1", "vdmtest_badargs", BAD_ARGS),
    "vt-unavailable": ("vdmtest-unavailable", "0.1", "vdmtest_unavailable", UNAVAILABLE),
    "vt-dup-b": ("vdmtest-dup-b", "0.1", "vdmtest_dup_b", _dup("b")),
    "vt-exits": ("vdmtest-exits", "0.1", "vdmtest_exits", EXITS),
    "vt-partial": ("vdmtest-partial", "0.1", "vdmtest_partial", PARTIAL),
    "vt-parts": ("vdmtest-parts", "0.1", "vdmtest_parts", PARTS),
    "vt-clash": ("vdmtest-clash", "0.1", "vdmtest_clash", CLASHING_COMMAND),
    "vt-fragile": ("vdmtest-fragile", "0.1", "vdmtest_fragile", FRAGILE_COMMANDS),
    "vt-dup-a": ("vdmtest-dup-a", "0.1", "vdmtest_dup_a", _dup("a")),
    "vt-specname": ("vdmtest-specname", "0.1", "vdmtest_specname", SPECNAME),
    "vt-api1": ("vdmtest-api1", "0.1", "vdmtest_api1", API1_SERVER),
    "vt-commands": ("vdmtest-commands", "0.1", "vdmtest_commands", COMMANDS),
    "vt-badserver": ("vdmtest-badserver", "0.1", "vdmtest_badserver", BAD_SERVER),
    "vt-oldpci": ("vdmtest-oldpci", "0.1", "vdmtest_oldpci", "VDM_API = 1\nfrom vdm.pci import PciBus\n"),
}

OUR_NAMES = sorted(PLUGINS)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site-packages")
    for ep, (dist, version, pkg, source) in PLUGINS.items():
        write_dist(
            site, dist, version, {ep: f"{pkg}.plugin"},
            {f"{pkg}/__init__.py": "", f"{pkg}/plugin.py": textwrap.dedent(source)},
        )
    return site


def ours(records: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in records if r["name"].startswith("vt-")}


#: load only the test plugins: the in-tree ones (whatever state they are in) are listed as disabled
ONLY_OURS = {"VDM_PLUGINS": ",".join(OUR_NAMES)}


@pytest.fixture(scope="module")
def listing(site) -> dict:
    return list_plugins_json(pythonpath=[site], env=ONLY_OURS)


@pytest.fixture(scope="module")
def table(site):
    return run_vdm(["list-plugins"], pythonpath=[site], env=ONLY_OURS)


@pytest.fixture(scope="module")
def shown(site) -> list[str]:
    """What the good plugin's ``vdm vt-show`` prints with every test plugin loaded."""
    proc = run_vdm(["vt-show"], pythonpath=[site], env=ONLY_OURS)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_every_test_plugin_is_listed_in_order(listing):
    names = [r["name"] for r in listing["plugins"]]
    assert sorted(ours(listing["plugins"])) == OUR_NAMES
    assert names == sorted(names)  # one fixed order: by entry-point name


def test_good_plugin_fields(listing, site):
    r = ours(listing["plugins"])["vt-good"]
    assert r["distribution"] == "vdmtest-good"
    assert r["version"] == "1.2.3"
    assert r["kind"] == "hypervisor/device"
    assert r["status"] == "available"
    assert r["hooks"] == ["vdm_register_commands", "vdm_register_devices", "vdm_register_hypervisors"]
    assert r["module"] == "vdmtest_good.plugin"
    assert r["path"] == str(site / "vdmtest_good" / "plugin.py")
    assert r["provides"] == {
        "devices": ["vt-gadget"], "hypervisors": ["vt-hv"], "servers": [], "commands": ["vt-show"]
    }
    assert r["availability"] == {"vt-gadget": "available", "vt-hv": "available"}
    assert (r["api"], r["deprecations"]) == (2, [])


def test_hooks_are_found_through_pluggy_not_by_attribute_name(listing, table):
    """Issue 19 item 4: registrations are attributed through pluggy's hook implementations, so a
    plugin whose functions carry other names (``specname``) provides what it registers."""
    r = ours(listing["plugins"])["vt-specname"]
    assert r["status"] == "available"
    assert r["hooks"] == ["vdm_register_devices", "vdm_register_servers"]
    assert r["provides"] == {
        "devices": ["vt-spec-dev"], "hypervisors": [], "servers": ["vt-spec-server"], "commands": []
    }
    assert r["kind"] == "server/device"
    assert parse_table(table.stdout)["vt-specname"]["kind"] == "server/device"


def test_api1_plugin_loads_with_deprecations_naming_the_change(listing):
    r = ours(listing["plugins"])["vt-api1"]
    assert r["status"] == "available" and r["api"] == 1
    assert r["kind"] == "hypervisor"  # an API-1 registration keeps working as it did
    (text,) = r["deprecations"]
    assert "written for vdm-core API 1" in text and "set VDM_API = 2" in text
    assert "ServerType from vdm_register_servers" in text


def test_api1_deprecation_is_a_python_warning_too(site, monkeypatch):
    from importlib.metadata import distributions

    from vdm.plugins import load_plugins

    monkeypatch.syspath_prepend(str(site))
    eps = [ep for d in distributions(path=[str(site)]) for ep in d.entry_points if ep.name == "vt-api1"]
    expected = r"vdm plugin vt-api1 \(vdmtest-api1\): written for vdm-core API 1"
    with pytest.warns(DeprecationWarning, match=expected):
        ps = load_plugins(eps=eps)
    assert "vt-old-server" in ps.hypervisors
    for mod in [m for m in sys.modules if m.startswith("vdmtest_")]:
        del sys.modules[mod]


@pytest.mark.parametrize(
    "name, dist, version, status",
    [
        ("vt-importfail", "vdmtest-importfail", "0.1",
         "failed: import failed: ModuleNotFoundError: No module named 'vdm_no_such_dependency'"),
        ("vt-unknownhook", "vdmtest-unknownhook", "0.1",
         "failed: unknown hook vdm_register_gizmos (is the plugin written for another vdm-core?)"),
        ("vt-raises", "vdmtest-raises", "0.1", "failed: vdm_register_hypervisors raised RuntimeError: boom"),
        ("vt-oldapi", "vdmtest-oldapi", "2.0",
         f"failed: plugin vt-oldapi (dist vdmtest-oldapi) needs vdm-core API 99, this is {vdm.API_VERSION} "
         "(it also loads API 1): install a vdm-core that provides API 99 or a release of the plugin "
         "for API 2"),
    ],
)
def test_failed_plugins_are_reported_by_name(listing, name, dist, version, status):
    r = ours(listing["plugins"])[name]
    assert (r["distribution"], r["version"], r["status"]) == (dist, version, status)
    assert r["kind"] == "-"
    assert r["provides"] == {"devices": [], "hypervisors": [], "servers": [], "commands": []}
    assert r["module"] == PLUGINS[name][2] + ".plugin"


def test_failed_plugins_provide_nothing(listing, shown):
    # the raising plugin registered "vt-never" before it raised: it must not be used
    assert shown and not any("vt-never" in line for line in shown)
    r = ours(listing["plugins"])
    assert r["vt-importfail"]["path"] == ""  # never imported
    assert r["vt-oldapi"]["path"].endswith("vdmtest_oldapi/plugin.py")  # imported, then refused


def test_plugin_with_wrong_hook_arguments(listing):
    r = ours(listing["plugins"])["vt-badargs"]
    assert r["status"].startswith("failed: invalid plugin: ")
    assert "vdm_register_devices" in r["status"] and "colour" in r["status"]


def test_unavailable_plugin_says_why(listing):
    r = ours(listing["plugins"])["vt-unavailable"]
    assert r["kind"] == "hypervisor"
    assert r["status"] == (
        "unavailable: vt-hv-missing: needs /dev/vt-nothing; "
        "vt-hv-broken: availability check failed: OSError: probe exploded"
    )
    assert r["availability"] == {
        "vt-hv-missing": "unavailable: needs /dev/vt-nothing",
        "vt-hv-broken": "unavailable: availability check failed: OSError: probe exploded",
    }


def test_table_matches_the_json(table, listing):
    proc = table
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "KIND", "STATUS"]
    rows = parse_table(proc.stdout)
    for name, r in ours(listing["plugins"]).items():
        assert rows[name] == {k: r[k] for k in ("name", "distribution", "version", "kind", "status")}
    assert proc.stderr == ""  # failures are in the table, not repeated on stderr


def test_conflict_reported_and_first_by_entry_point_name_wins(table, listing, shown):
    msg = (
        "device 'vt-dup' is provided by vdmtest-dup-a and vdmtest-dup-b; using vdmtest-dup-a "
        "(set VDM_PREFER=vt-dup=<distribution> to choose)"
    )
    assert msg in listing["conflicts"]
    assert f"conflict: {msg}" in table.stdout.splitlines()
    assert "device vt-dup from vdmtest-dup-a: made by a" in shown


@pytest.mark.parametrize("prefer, winner", [("vdmtest-dup-b", "b"), ("vdmtest-dup-a", "a")])
def test_vdm_prefer_chooses(site, prefer, winner):
    env = {"VDM_PREFER": f"other=x, vt-dup={prefer}"}
    proc = run_vdm(["vt-show"], pythonpath=[site], env=env)
    assert f"device vt-dup from vdmtest-dup-{winner}: made by {winner}" in proc.stdout.splitlines()
    if winner == "b":  # the choice is reported too
        listing = list_plugins_json(pythonpath=[site], env=env)
        (conflict,) = [c for c in listing["conflicts"] if "'vt-dup'" in c]
        assert f"using vdmtest-dup-{winner} " in conflict


def _loaded(listing: dict) -> dict[str, str]:
    return {r["name"]: r["status"] for r in listing["plugins"]}


def test_vdm_plugins_restricts_loading(site):
    listing = list_plugins_json(pythonpath=[site], env={"VDM_PLUGINS": "vt-good, vt-dup-b"})
    status = _loaded(listing)
    assert status["vt-good"] == "available" and status["vt-dup-b"] == "available"
    assert {s for n, s in status.items() if n not in ("vt-good", "vt-dup-b")} == {"disabled"}
    assert listing["conflicts"] == []


def test_plugins_option_restricts_loading_and_beats_the_environment(site):
    proc = run_vdm(["--plugins", "vt-importfail", "list-plugins", "--json"], pythonpath=[site],
                   env={"VDM_PLUGINS": "vt-good"})
    status = _loaded(json.loads(proc.stdout))
    assert status["vt-good"] == "disabled"
    assert status["vt-importfail"].startswith("failed: import failed")
    # a command of a plugin that is not loaded does not exist
    proc = run_vdm(["--plugins", "vt-dup-a", "vt-show"], pythonpath=[site])
    assert proc.returncode == 2 and "invalid choice: 'vt-show'" in proc.stderr


def test_failures_go_to_stderr_for_other_commands(site):
    proc = run_vdm(["--plugins", "vt-good,vt-importfail,vt-oldapi", "vt-show"], pythonpath=[site])
    assert proc.returncode == 0
    assert "device vt-gadget from vdmtest-good: a test gadget" in proc.stdout
    err = proc.stderr.splitlines()
    assert (
        "vdm: plugin vt-importfail (vdmtest-importfail 0.1) failed: import failed: "
        "ModuleNotFoundError: No module named 'vdm_no_such_dependency'"
    ) in err
    assert (
        "vdm: plugin vt-oldapi (vdmtest-oldapi 2.0) failed: plugin vt-oldapi (dist vdmtest-oldapi) "
        f"needs vdm-core API 99, this is {vdm.API_VERSION} (it also loads API 1): install a vdm-core that "
        "provides API 99 or a release of the plugin for API 2"
    ) in err


def test_strict_exit_status(site):
    ok = run_vdm(["--strict", "--plugins", "vt-good", "vt-show"], pythonpath=[site])
    assert ok.returncode == 0 and "vt-gadget" in ok.stdout
    bad = run_vdm(["--strict", "--plugins", "vt-good,vt-raises", "vt-show"], pythonpath=[site])
    assert bad.returncode == 1
    assert "vt-gadget" not in bad.stdout  # the command did not run
    assert "vdm: plugin vt-raises (vdmtest-raises 0.1) failed: vdm_register_hypervisors raised" in bad.stderr
    assert run_vdm(["--strict", "--plugins", "vt-good", "list-plugins"], pythonpath=[site]).returncode == 0


def test_strict_list_plugins_still_lists(site):
    """``vdm --strict list-plugins`` is how a user finds out *which* plugin is broken."""
    proc = run_vdm(["--strict", "--plugins", "vt-good,vt-unknownhook", "list-plugins"], pythonpath=[site])
    assert proc.returncode == 1
    rows = parse_table(proc.stdout)
    assert rows["vt-unknownhook"]["status"].startswith("failed: unknown hook vdm_register_gizmos")
    assert rows["vt-good"]["status"] == "available"


def test_no_plugin_loaded(site):
    """A name no plugin has loads nothing, and says so (issue 20 item 11: it used to be silent)."""
    proc = run_vdm(["list-plugins"], pythonpath=[site], env={"VDM_PLUGINS": "none-such"})
    assert proc.returncode == 0
    assert proc.stderr.startswith("vdm: VDM_PLUGINS: no plugin named 'none-such' (installed: ")
    assert len(proc.stderr.splitlines()) == 1
    rows = parse_table(proc.stdout)
    assert rows and {r["status"] for r in rows.values()} == {"disabled"}
    assert run_vdm(["--strict", "list-plugins"], env={"VDM_PLUGINS": "none-such"}).returncode == 1


def _core_only_path(tmp_path: Path) -> list[Path]:
    """sys.path entries with vdm-core and its dependencies but no site-packages (no plugins)."""
    deps = tmp_path / "deps"
    deps.mkdir()
    for mod in ("pluggy", "tomli", "importlib_metadata", "zipp", "typing_extensions"):
        spec = __import__("importlib.util").util.find_spec(mod)
        if spec is None or spec.origin is None:
            continue
        src = Path(spec.origin)
        src = src.parent if src.name == "__init__.py" else src
        (deps / src.name).symlink_to(src)
    core_src = Path(vdm.__file__).resolve().parent.parent
    return [core_src, deps]


def test_only_vdm_core_installed(tmp_path):
    """No plugin distribution at all (``python -S``: no site-packages): an empty list, exit 0."""
    path = _core_only_path(tmp_path)
    proc = run_vdm(["list-plugins"], pythonpath=path, python_flags=["-S"], cwd=tmp_path,
                   inherit_pythonpath=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "no vdm plugins installed (install e.g. vdm-blk, vdm-kvm)\n"
    proc = run_vdm(["--strict", "list-plugins", "--json"], pythonpath=path, python_flags=["-S"], cwd=tmp_path,
                   inherit_pythonpath=False)
    assert proc.returncode == 0
    listing = json.loads(proc.stdout)
    assert listing.pop("fastpath").startswith(("compiled", "python ("))  # (-S: no cffi backend)
    assert listing == {"plugins": [], "conflicts": []}
    proc = run_vdm([], pythonpath=path, python_flags=["-S"], cwd=tmp_path,
                   inherit_pythonpath=False)
    assert proc.returncode == 0 and "list-plugins" in proc.stdout


def test_in_process_loader_with_explicit_entry_points(site, monkeypatch):
    """load_plugins() given entry points directly (what an embedding application would do)."""
    from importlib.metadata import distributions

    from vdm.plugins import load_plugins

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("VDM_PLUGINS", raising=False)
    eps = [
        ep
        for d in distributions(path=[str(site)])
        for ep in d.entry_points
        if ep.group == "vdm.plugins" and ep.name in ("vt-good", "vt-dup-a", "vt-dup-b")
    ]
    assert len(eps) == 3
    ps = load_plugins(eps=eps)
    assert [p.name for p in ps.plugins] == ["vt-dup-a", "vt-dup-b", "vt-good"]
    assert ps.device_type("vt-dup").help == "made by a"
    assert ps.device_for_flag("--vt-gadget").name == "vt-gadget"
    assert ps.errors == []
    for mod in [m for m in sys.modules if m.startswith("vdmtest_")]:
        del sys.modules[mod]
    assert os.environ.get("VDM_PLUGINS") is None


def test_plugin_that_exits_at_import_is_reported(listing):
    r = ours(listing["plugins"])["vt-exits"]
    assert (r["distribution"], r["status"]) == ("vdmtest-exits", "failed: import failed: SystemExit: 3")


def test_command_named_like_a_builtin_is_refused(listing, table):
    # vdm's own list-plugins ran (this listing is its output), and the clash is reported
    assert "command 'list-plugins' of vdmtest-clash ignored: vdm has its own" in listing["conflicts"]
    assert "conflict: command 'list-plugins' of vdmtest-clash ignored: vdm has its own" in table.stdout
    assert table.returncode == 0


def test_commands_whose_check_or_options_raise(site):
    proc = run_vdm(["vt-probe", "arg"], pythonpath=[site])
    assert proc.returncode == 1
    assert (
        "vdm: vt-probe is provided by vdmtest-fragile, which is unavailable here: "
        "availability check failed: OSError: probe exploded"
    ) in proc.stderr.splitlines()
    proc = run_vdm(["vt-opts", "--x", "1"], pythonpath=[site])
    assert proc.returncode == 1
    assert "vdm: vt-opts is provided by vdmtest-fragile, which is unavailable here: its options are broken " \
           "(ArgumentError: argument --x: conflicting option string: --x)" in proc.stderr.splitlines()
    # the help still works, shows the good plugin's command and marks the broken one unavailable
    proc = run_vdm(["--help"], pythonpath=[site])
    assert proc.returncode == 0 and "vt-show" in proc.stdout
    assert "vt-probe            (unavailable here) check raises" in proc.stdout


def test_plugins_option_tolerates_spaces(site):
    """``--plugins "a, b"`` means the same as ``VDM_PLUGINS="a, b"``."""
    proc = run_vdm(["--plugins", "vt-good, vt-dup-a", "list-plugins", "--json"], pythonpath=[site])
    status = _loaded(json.loads(proc.stdout))
    assert status["vt-good"] == "available" and status["vt-dup-a"] == "available"


def test_partly_available_plugin(listing):
    r = ours(listing["plugins"])["vt-partial"]
    assert r["kind"] == "hypervisor/device"
    assert r["status"] == "available (unavailable vt-partial-dev: needs a licence)"
    assert r["availability"] == {
        "vt-partial-dev": "unavailable: needs a licence",
        "vt-partial-hv": "available",
    }


def test_a_device_types_parts_are_listed_with_why_each_is_unusable(listing, table):
    """vdm-blk's protocols are such parts (issue 17: ``nbd: unavailable: libnbd not found``)."""
    r = ours(listing["plugins"])["vt-parts"]
    assert r["parts"] == {
        "vt-parts-dev": {
            "protocols": {
                "local": "available",
                "remote": "unavailable: libremote not found (apt install libremote1)",
            }
        }
    }
    # a parts() that raises or answers junk costs its parts listing, never the plugin or the type
    assert set(r["availability"].values()) == {"available"} and len(r["availability"]) == 3
    assert r["parts_errors"] == {
        "vt-parts-bad": "OSError: probe exploded",
        "vt-parts-junk": "parts() must return {group: {name: None or reason}}",
    }
    assert r["status"] == (
        "available (remote: unavailable: libremote not found (apt install libremote1); "
        "vt-parts-bad parts unknown: OSError: probe exploded; "
        "vt-parts-junk parts unknown: parts() must return {group: {name: None or reason}})"
    )
    row = next(ln for ln in table.stdout.splitlines() if ln.startswith("vt-parts "))
    assert row.endswith(r["status"])


# ---- commands that cannot run here still explain themselves (issue 19 item 12) ---------------------------


def test_unavailable_command_help_shows_its_options_and_the_reason(site):
    proc = run_vdm(["vt-away", "--help"], pythonpath=[site], env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: vdm vt-away [-h] [--speed SPEED] target")
    assert "--speed SPEED  how fast to go" in proc.stdout
    assert "Unavailable here: needs /dev/vt-away" in proc.stdout


def test_unavailable_command_is_listed_as_such_in_vdm_help(site):
    proc = run_vdm(["--help"], pythonpath=[site], env={"COLUMNS": "200"})
    assert proc.returncode == 0
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    assert "vt-away             (unavailable here) go away" in lines
    assert "vt-here             stay [vdmtest-commands]" in lines


@pytest.mark.parametrize(
    "argv", [["vt-away"], ["vt-away", "x", "--speed", "fast"], ["vt-away", "x", "y", "--what"]]
)
def test_unavailable_command_says_why_whatever_its_arguments(site, argv):
    """Missing or wrong arguments of a command that cannot run here: the reason, not a usage error."""
    proc = run_vdm(["--plugins", "vt-commands", *argv], pythonpath=[site])
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "vdm: vt-away is provided by vdmtest-commands, which is unavailable here: needs /dev/vt-away"
    ]


def test_command_gets_the_plugin_set_and_the_api1_attribute_warns(site):
    proc = run_vdm(["--plugins", "vt-commands,vt-good", "vt-here"], pythonpath=[site])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "1 device types; DeprecationWarning: parser.vdm_plugins is deprecated (plugin API 2): "
        "use parser.get_default('plugin_set')",
        "plugin_set",
    ]


def test_a_bad_server_registration_fails_that_plugin_alone(listing):
    r = ours(listing["plugins"])["vt-badserver"]
    assert r["status"] == "failed: vdm_register_servers ServerType vt-bad-server: check must be callable"
    assert r["provides"] == {"devices": [], "hypervisors": [], "servers": [], "commands": []}
    assert ours(listing["plugins"])["vt-good"]["status"] == "available"


def test_unavailable_command_whose_options_need_what_is_missing_keeps_its_reason(site):
    proc = run_vdm(["--plugins", "vt-commands", "vt-gone", "x"], pythonpath=[site])
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "vdm: vt-gone is provided by vdmtest-commands, which is unavailable here: libgone not installed"
    ]
    proc = run_vdm(["--plugins", "vt-commands", "vt-gone", "--help"], pythonpath=[site])
    assert proc.returncode == 0 and "Unavailable here: libgone not installed" in proc.stdout


def test_api1_plugin_importing_a_removed_module_is_told_what_to_change(listing):
    r = ours(listing["plugins"])["vt-oldpci"]
    assert r["status"] == (
        "failed: import failed: ModuleNotFoundError: No module named 'vdm.pci' (removed in vdm-core plugin "
        "API 2: the x86 PCI bus moved to vdm-kvm (vdm_kvm.pci_bus.PciBus), the type-0 configuration space "
        "to vdm.transport.pci_config; see docs/plugins.md 'Changes in API 2')"
    )
