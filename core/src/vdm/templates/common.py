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
test = ["pytest>=7"]

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

    pip install -e .            # vdm finds the plugin through its "vdm.plugins" entry point
    vdm list-plugins            # shows "$name" with its distribution and status
    python -m pytest            # the tests use vdm.testing: no VM needed

Where to go from here: `src/$pkg/plugin.py` registers what the plugin provides; the hooks are
described in vdm's docs/plugins.md (or `help(vdm.hookspecs)`).
''',
    "src/$pkg/__init__.py": '''\
"""$dist: a $kind plugin for vdm."""

__version__ = "0.1.0"
''',
}
