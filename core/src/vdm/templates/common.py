"""Files every generated plugin project has: pyproject.toml, README.md, the package's __init__."""

FILES = {
    "pyproject.toml": '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "$dist: a $kind plugin for vdm"
readme = "README.md"
requires-python = ">=3.9"
dependencies = ["vdm-core>=$core_version"]

[project.optional-dependencies]
# vdm-lab boots a real Linux guest against the device (tests/test_realguest.py); it lives in vdm's
# repository (lab/): where your index lacks it, pip install -e /path/to/vdm/lab first.
test = ["pytest>=7", "vdm-lab"]

# This is what makes it a vdm plugin: vdm loads every entry point of this group.
[project.entry-points."vdm.plugins"]
$name = "$pkg.plugin"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''',
    "README.md": '''\
# $dist

A $kind plugin for vdm (virtio devices for KVM, Xen and vhost-user), made by `vdm new-plugin`.

    pip install -e '.[test]'    # vdm finds the plugin through its "vdm.plugins" entry point;
                                # the test extra adds pytest and vdm-lab (real-guest tests)
    vdm list-plugins            # shows "$name" with its distribution and status
    python -m pytest            # vdm.testing's in-process driver, and a real guest where QEMU is

Where to go from here: `src/$pkg/plugin.py` registers what the plugin provides; the hooks are
described in vdm's docs/plugins.md (or `help(vdm.hookspecs)`). A test that boots a real Linux
guest uses vdm-lab (docs/plugins.md, "Testing your device in a real guest"): it skips, saying
why, where QEMU or the guest kit is missing.
''',
    "src/$pkg/__init__.py": '''\
"""$dist: a $kind plugin for vdm."""

__version__ = "0.1.0"
''',
}
