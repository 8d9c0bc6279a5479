"""Finding and loading plugins, one at a time, so that a broken one never takes the others down.

Every entry point of the ``vdm.plugins`` group is a plugin module. Each is imported separately;
a module that fails to import, declares an API version this core does not provide, fails pluggy's
validation (unknown hook, wrong arguments) or raises in a hook is recorded with its name,
distribution, version and error, and the rest keep working. ``VDM_PLUGINS`` (a comma list of
plugin names) or ``--plugins`` restricts what is loaded.

Conflicts: when two plugins register the same device or hypervisor name, plugins are taken in a
fixed order -- by entry-point name, then distribution name -- and the first one wins, unless
``VDM_PREFER`` (``name=distribution,...``) names the distribution that should provide it. Every
conflict is reported by ``vdm list-plugins``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable, Optional

import pluggy

from . import API_VERSION
from .hookspecs import PROJECT, PluginSpec
from .registry import Command, DeviceType, HypervisorType

if sys.version_info >= (3, 10):
    from importlib.metadata import EntryPoint, entry_points
else:  # pragma: no cover - Python 3.9
    from importlib_metadata import EntryPoint, entry_points

__all__ = ["ENTRY_POINT_GROUP", "PluginInfo", "PluginSet", "load_plugins"]

ENTRY_POINT_GROUP = "vdm.plugins"


@dataclass
class PluginInfo:
    """One plugin as ``vdm list-plugins`` shows it."""

    name: str
    distribution: str
    version: str
    module: str
    path: str = ""
    #: "loaded", "failed" or "disabled"
    state: str = "loaded"
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    hypervisors: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    #: per provided name: None (available) or the reason it is not
    availability: dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        kinds = []
        if self.hypervisors:
            kinds.append("hypervisor")
        if self.devices:
            kinds.append("device")
        if self.commands and not kinds:
            kinds.append("command")
        return kinds

    @property
    def status(self) -> str:
        if self.state == "failed":
            # one line: pluggy's validation messages (and some exceptions') span several
            return "failed: " + "; ".join(ln.strip() for ln in self.error.splitlines() if ln.strip())
        if self.state == "disabled":
            return "disabled"
        reasons = [
            f"{n}: {r}" if len(self.availability) > 1 else r for n, r in self.availability.items() if r
        ]
        if not self.availability:
            return "available" if self.commands else "unavailable: provides nothing"
        if len(reasons) == len(self.availability):
            return "unavailable: " + "; ".join(reasons)
        if reasons:
            return "available (" + "; ".join("unavailable " + r for r in reasons) + ")"
        return "available"


@dataclass
class PluginSet:
    """Everything the loaded plugins provide."""

    plugins: list[PluginInfo] = field(default_factory=list)
    devices: dict[str, tuple[DeviceType, PluginInfo]] = field(default_factory=dict)
    hypervisors: dict[str, tuple[HypervisorType, PluginInfo]] = field(default_factory=dict)
    commands: dict[str, tuple[Command, PluginInfo]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    manager: Optional[pluggy.PluginManager] = None

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.state == "failed"]

    def device_type(self, name: str) -> DeviceType:
        return self.devices[name][0]

    def device_for_flag(self, flag: str) -> DeviceType | None:
        for dt, _ in self.devices.values():
            if flag in (dt.cli_flag, dt.cli_short):
                return dt
        return None


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


def _preferences() -> dict[str, str]:
    prefs = {}
    for item in os.environ.get("VDM_PREFER", "").split(","):
        if "=" in item:
            name, dist = item.split("=", 1)
            prefs[name.strip()] = dist.strip()
    return prefs


def _check(fn: Callable[[], Optional[str]] | None) -> Optional[str]:
    if fn is None:
        return None
    try:
        return fn()
    except Exception as e:  # a broken availability check is reported, not fatal
        return f"availability check failed: {type(e).__name__}: {e}"


def _api_error(module: ModuleType, info: PluginInfo) -> str | None:
    needed = getattr(module, "VDM_API", None)
    if needed is None:
        return None
    if not isinstance(needed, int) or needed != API_VERSION:
        return (
            f"plugin {info.name} (dist {info.distribution}) needs vdm-core API {needed}, "
            f"this is {API_VERSION}"
        )
    return None


def load_plugins(only: Iterable[str] | None = None, eps: Iterable[EntryPoint] | None = None) -> PluginSet:
    """Load the plugins of the ``vdm.plugins`` group (or ``eps``) and collect what they provide.

    :param only: names of the plugins to load (default: ``VDM_PLUGINS`` if set, else all).
    """
    if only is None and os.environ.get("VDM_PLUGINS"):
        only = [n.strip() for n in os.environ["VDM_PLUGINS"].split(",") if n.strip()]
    wanted = set(only) if only is not None else None
    found = list(eps) if eps is not None else list(entry_points(group=ENTRY_POINT_GROUP))
    found.sort(key=lambda ep: (ep.name, _dist_of(ep)[0]))
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PluginSpec)
    result = PluginSet(manager=pm)
    prefs = _preferences()
    for ep in found:
        dist, version = _dist_of(ep)
        info = PluginInfo(ep.name, dist, version, ep.value)
        result.plugins.append(info)
        if wanted is not None and ep.name not in wanted:
            info.state = "disabled"
            continue
        try:
            module = ep.load()
        except (Exception, SystemExit) as e:  # sys.exit() at import must not end vdm
            info.state, info.error = "failed", f"import failed: {type(e).__name__}: {e}"
            continue
        info.path = getattr(module, "__file__", "") or ""
        why = _api_error(module, info)
        if why:
            info.state, info.error = "failed", why
            continue
        try:
            pm.register(module, name=f"{dist}:{ep.name}")
        except pluggy.PluginValidationError as e:
            info.state, info.error = "failed", f"invalid plugin: {e}"
            continue
        except ValueError as e:  # registered twice (same module under two entry points)
            info.state, info.error = "failed", str(e)
            continue
        callers = pm.get_hookcallers(module) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if unknown:
            pm.unregister(module)
            info.state = "failed"
            info.error = f"unknown hook {', '.join(unknown)} (is the plugin written for another vdm-core?)"
            continue
        info.hooks = sorted(c.name for c in callers)
        _collect(pm, module, info, result, prefs)
    return result


def _collect(
    pm: pluggy.PluginManager, module: ModuleType, info: PluginInfo, result: PluginSet, prefs: dict[str, str]
) -> None:
    provided: list[tuple[str, Any]] = []

    def call(hook_name: str) -> None:
        impl = getattr(module, hook_name, None)
        if impl is None:
            return
        kind = hook_name[len("vdm_register_") :]
        try:
            impl(register=lambda obj: provided.append((kind, obj)))
        except (Exception, SystemExit) as e:
            info.state, info.error = "failed", f"{hook_name} raised {type(e).__name__}: {e}"

    for hook_name in info.hooks:
        call(hook_name)
    if info.state == "failed":
        pm.unregister(module)
        return
    for kind, obj in provided:
        if kind == "devices":
            _add(result.devices, obj.name, obj, info, "device", result, prefs)
            info.devices.append(obj.name)
            info.availability[obj.name] = _check(obj.check)
        elif kind == "hypervisors":
            _add(result.hypervisors, obj.name, obj, info, "hypervisor", result, prefs)
            info.hypervisors.append(obj.name)
            info.availability[obj.name] = _check(obj.check)
        elif kind == "commands":
            _add(result.commands, obj.name, obj, info, "command", result, prefs)
            info.commands.append(obj.name)


def _add(
    table: dict, name: str, obj: Any, info: PluginInfo, what: str, result: PluginSet, prefs: dict
) -> None:
    if name in table:
        other = table[name][1]
        if prefs.get(name) == info.distribution:
            winner, loser = info, other
            table[name] = (obj, info)
        else:
            winner, loser = other, info
        result.conflicts.append(
            f"{what} '{name}' is provided by {other.distribution} and {info.distribution}; "
            f"using {winner.distribution} (set VDM_PREFER={name}=<distribution> to choose)"
        )
        del loser
        return
    table[name] = (obj, info)
