"""``vdm new-plugin``: the generated projects install, pass their own tests and show up in vdm."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from vdm import API_VERSION
from vdm.cli.new_plugin import generate, project_names
from vdm.config import load_toml
from vdm.errors import UserError

from tests.core.installed import clean_env, make_venv, pip_install, run_vdm

DEVICE_FILES = [
    "README.md",
    "pyproject.toml",
    "src/vdm_demo_dev/__init__.py",
    "src/vdm_demo_dev/config.py",
    "src/vdm_demo_dev/device.py",
    "src/vdm_demo_dev/plugin.py",
    "tests/test_device.py",
    "tests/test_realguest.py",
]
HYPERVISOR_FILES = [
    "README.md",
    "pyproject.toml",
    "src/vdm_demo_hv/__init__.py",
    "src/vdm_demo_hv/plugin.py",
    "src/vdm_demo_hv/vmm.py",
    "tests/test_vmm.py",
]


PLACEHOLDER = re.compile(r"\$\{?(name|dist|pkg|cls|toml|kind|api|core_version|device_id|virtio_id)\b")


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_names():
    assert project_names("demo-dev") == {
        "name": "demo-dev",
        "dist": "vdm-demo-dev",
        "pkg": "vdm_demo_dev",
        "cls": "DemoDev",
        "toml": "demo_dev",
    }
    for bad in ("Demo", "demo_dev", "-demo", "demo-", "demo--dev", "1demo", "", "de mo", "vdm-demo", "vdm"):
        with pytest.raises(UserError) as e:
            project_names(bad)
        assert "\n" not in str(e.value) and str(e.value).startswith("new-plugin: ")


@pytest.mark.parametrize("kind, name, expected", [("device", "demo-dev", DEVICE_FILES),
                                                   ("hypervisor", "demo-hv", HYPERVISOR_FILES)])
def test_generated_files(tmp_path, kind, name, expected):
    root = generate(name, kind, tmp_path, device_id=0x2A)
    assert root == tmp_path / f"vdm-{name}"
    assert files(root) == expected
    assert [p.name for p in tmp_path.iterdir()] == [f"vdm-{name}"]  # no temporary folder left
    project = load_toml(str(root / "pyproject.toml"))
    assert project["project"]["name"] == f"vdm-{name}"
    assert project["project"]["entry-points"]["vdm.plugins"] == {name: f"vdm_{name.replace('-', '_')}.plugin"}
    pkg = root / "src" / f"vdm_{name.replace('-', '_')}"
    plugin = (pkg / "plugin.py").read_text()
    assert f"VDM_API = {API_VERSION}\n" in plugin
    for path in root.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")  # every file is valid Python
        # the real-guest test's workload is shell ($P_devid), so look for the template's own names
        assert not PLACEHOLDER.search(path.read_text()), f"unsubstituted placeholder in {path}"
    if kind == "device":
        assert "device_id = 42\n" in (pkg / "device.py").read_text()
        assert 'cli_flag="--demo-dev"' in plugin and 'toml_key="demo_dev"' in plugin
        assert "virtio_id=42," in plugin  # vdm dm-only maps Xen's virtio,device42 to it
        assert "DEVICE_ID = 42\n" in (root / "tests" / "test_realguest.py").read_text()


@pytest.mark.parametrize("device_id, says, virtio_id", [
    (0, '0 is "no device"', "None"),
    (4, "4 is the entropy source", "4"),
    (9, "9 is the 9P transport", "9"),
    (0x1234, "4660 is your device type's id", "4660"),
])
def test_skeleton_comments_and_virtio_id_follow_the_device_id(tmp_path, device_id, says, virtio_id):
    root = generate("demo", "device", tmp_path, device_id=device_id)
    device = (root / "src" / "vdm_demo" / "device.py").read_text()
    plugin = (root / "src" / "vdm_demo" / "plugin.py").read_text()
    assert says in device and f"device_id = {device_id}\n" in device
    assert f"virtio_id={virtio_id}," in plugin
    others = [w for w in ("entropy", "9P transport", "no device") if w not in says]
    assert not [w for w in others if w in device], device  # nothing said about another device type


def test_quick_start_installs_the_test_extra(tmp_path):
    root = generate("demo", "device", tmp_path)
    assert "pip install -e '.[test]'" in (root / "README.md").read_text()
    project = load_toml(str(root / "pyproject.toml"))
    test_extra = project["project"]["optional-dependencies"]["test"]
    assert any(r.startswith("pytest") for r in test_extra) and "vdm-lab" in test_extra


def test_refuses_to_overwrite(tmp_path):
    existing = tmp_path / "vdm-demo"
    existing.mkdir()
    (existing / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        generate("demo", "device", tmp_path)
    assert files(existing) == ["mine.txt"] and (existing / "mine.txt").read_text() == "precious"
    (tmp_path / "vdm-other").write_text("a file, not a folder")
    with pytest.raises(UserError, match="already exists"):
        generate("other", "hypervisor", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vdm-demo", "vdm-other"]


def test_command_line(tmp_path):
    proc = run_vdm(["new-plugin", "demo", "--kind", "device"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "created vdm-demo (device plugin) in vdm-demo"
    next_line = "next: cd vdm-demo && pip install -e '.[test]' && python -m pytest && vdm list-plugins"
    assert next_line in proc.stdout
    assert (tmp_path / "vdm-demo" / "src" / "vdm_demo" / "device.py").is_file()
    before = files(tmp_path)
    again = run_vdm(["new-plugin", "demo", "--kind", "hypervisor"], cwd=tmp_path)
    assert again.returncode == 1
    assert "vdm: new-plugin: vdm-demo already exists; not overwriting it" in again.stderr
    assert files(tmp_path) == before
    bad = run_vdm(["new-plugin", "Demo", "--kind", "device"], cwd=tmp_path)
    assert bad.returncode == 1 and "'Demo' is not a plugin name" in bad.stderr
    proc = run_vdm(["new-plugin", "hv", "--kind", "hypervisor", "-C", str(tmp_path / "vdm-demo")])
    assert proc.returncode == 0 and (tmp_path / "vdm-demo" / "vdm-hv" / "pyproject.toml").is_file()
    bad_ids = (("0x10000", "65536 is not a 16-bit virtio device id"), ("abc", "not a number: 'abc'"))
    for bad_id, why in bad_ids:
        proc = run_vdm(["new-plugin", "x", "--kind", "device", "--device-id", bad_id], cwd=tmp_path)
        assert proc.returncode == 2 and f"argument --device-id: {why}" in proc.stderr
    assert not (tmp_path / "vdm-x").exists()


def test_name_already_provided_by_an_installed_plugin(tmp_path):
    proc = run_vdm(["--plugins", "blk", "new-plugin", "blk", "--kind", "device"], cwd=tmp_path)
    listed = run_vdm(["--plugins", "blk", "list-plugins", "--json"])
    if '"vdm-blk"' not in listed.stdout:
        pytest.skip("vdm-blk is not installed here")
    assert proc.returncode == 0
    note = "note: vdm-blk already provides 'blk'; installing both is a conflict (see VDM_PREFER)"
    assert note in proc.stderr
    assert (tmp_path / "vdm-blk" / "pyproject.toml").is_file()


def _guest_can_boot() -> str | None:
    """Why the generated real-guest test cannot boot a guest here, or None when it can."""
    try:
        import vdm_lab
    except ImportError:
        return "vdm-lab is not installed"
    if vdm_lab.qemu_binary() is None:
        return "qemu-system-x86_64 is not installed"
    try:
        vdm_lab.guestkit()
    except vdm_lab.GuestKitError as e:
        return f"the guest kit cannot be built: {str(e).strip().splitlines()[-1:]}"
    return None


@pytest.mark.slow
@pytest.mark.realguest
def test_generated_projects_install_pass_their_tests_and_are_listed(tmp_path):
    """The device project is made with --device-id 4 (QEMU's vhost-user-rng-pci exists for it), so
    its real-guest test boots the guest kit with the generated device and sees virtio_rng bind it."""
    dev = generate("demo-dev", "device", tmp_path, device_id=4)
    hv = generate("demo-hv", "hypervisor", tmp_path)
    python = make_venv(tmp_path / "venv")
    pip_install(python, dev, hv)
    no_guest = _guest_can_boot()
    for project, count in ((dev, 6), (hv, 3)):
        # the tests run from a copy holding only tests/, so the package comes from the install
        tests = tmp_path / f"run-{project.name}"
        shutil.copytree(project / "tests", tests / "tests")
        proc = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
            cwd=tests, env=clean_env(), capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if project is dev and no_guest:
            assert f"{count - 1} passed, 1 skipped" in proc.stdout, proc.stdout
            print(f"the generated real-guest test skipped as it should: {no_guest}")
        else:
            assert f"{count} passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    if shutil.which("ruff"):
        lint = subprocess.run(["ruff", "check", "--isolated", "--select", "F,E9,B", str(dev), str(hv)],
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    proc = run_vdm(["list-plugins", "--json"], python=python)
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)["plugins"]}
    for name, kind in (("demo-dev", "device"), ("demo-hv", "hypervisor")):
        r = records[name]
        assert (r["distribution"], r["version"], r["kind"], r["status"]) == (f"vdm-{name}", "0.1.0", kind,
                                                                              "available")
        assert r["path"].endswith(f"site-packages/vdm_{name.replace('-', '_')}/plugin.py")
