"""Plugin API versions: whether a plugin module's ``VDM_API`` is one this core loads, and what a
plugin written for an older API (or importing a core module that API 2 removed) must change.

Used by :func:`vdm.plugins.load_plugins`; each answer is one line for ``vdm list-plugins``.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from . import API_VERSION, SUPPORTED_API_VERSIONS
from .plugin_calls import describe, printable

if TYPE_CHECKING:
    from .plugins import PluginInfo

__all__ = ["API1_CHANGES", "REMOVED_IN_API2", "api_error", "import_hint"]


#: what a plugin written for API 1 changes to be an API-2 plugin (docs/plugins.md, "Changes in API 2")
API1_CHANGES = (
    "written for vdm-core API 1, which still loads but is deprecated: follow docs/plugins.md "
    "'Changes in API 2' and set VDM_API = 2 (vdm.hypervisor -> vdm.interrupts/vdm.iorange; a "
    "HypervisorType that implements no VMM hook -> ServerType from vdm_register_servers; "
    "parser.vdm_plugins -> parser.get_default('plugin_set'))"
)

#: core modules API 2 removed without an alias, and where their contents went
REMOVED_IN_API2 = {
    "vdm.pci": "the x86 PCI bus moved to vdm-kvm (vdm_kvm.pci_bus.PciBus), the type-0 configuration "
    "space to vdm.transport.pci_config",
}


def import_hint(why: str) -> str:
    """``why`` (an import failure), with what to change when it names a module API 2 removed."""
    for name, moved in REMOVED_IN_API2.items():
        if why.endswith(f"No module named '{name}'"):
            see = "see docs/plugins.md 'Changes in API 2'"
            return f"{why} (removed in vdm-core plugin API 2: {moved}; {see})"
    return why


def api_error(module: ModuleType, info: PluginInfo) -> str | None:
    """Why the module's ``VDM_API`` is refused, or None (it is then kept in ``info.api``)."""
    try:
        needed = getattr(module, "VDM_API", None)
    except Exception as e:  # a module __getattr__ that raises
        return f"reading VDM_API raised {describe(e)}"
    if needed is None:
        return None
    if type(needed) is not int or needed not in SUPPORTED_API_VERSIONS:
        return (
            f"plugin {info.name} (dist {info.distribution}) needs vdm-core API {printable(repr(needed))}, "
            f"this is {API_VERSION} (it also loads API {', '.join(map(str, SUPPORTED_API_VERSIONS[:-1]))}): "
            f"install a vdm-core that provides API {printable(repr(needed))} or a release of the plugin "
            f"for API {API_VERSION}"
        )
    info.api = needed
    if needed < API_VERSION:
        info.deprecations.append(API1_CHANGES)
    return None
