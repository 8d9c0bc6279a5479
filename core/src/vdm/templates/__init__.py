"""Project templates for ``vdm new-plugin``.

Each kind of plugin is a module here with a ``FILES`` mapping: a relative path (itself a
:class:`string.Template`) to the file's text (a :class:`string.Template`). They are Python modules
rather than data files so that they ship in every build of vdm-core without package-data rules.
Placeholders: ``$name`` (the plugin name, ``demo-dev``), ``$dist`` (``vdm-demo-dev``), ``$pkg``
(``vdm_demo_dev``), ``$cls`` (``DemoDev``), ``$toml`` (``demo_dev``), ``$api`` (the plugin API
version), ``$core_version``, ``$device_id``.
"""

from __future__ import annotations

from . import common, device, hypervisor

__all__ = ["KINDS", "common", "device", "hypervisor"]

#: kind -> the template modules whose files make up such a project, in order
KINDS = {"device": (common, device), "hypervisor": (common, hypervisor)}
