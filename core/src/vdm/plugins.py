"""Finding and loading plugins, one at a time, so that a broken one never takes the others down.

Every entry point of the ``vdm.plugins`` group is a plugin module. Each is imported separately;
a module that fails to import, declares an API version this core does not provide, fails pluggy's
validation (unknown hook, wrong arguments) or raises in a hook is recorded with its name,
distribution, version and error, and the rest keep working. ``VDM_PLUGINS`` (a comma list of
plugin names) or ``--plugins`` restricts what is loaded.

Every call into a plugin while loading -- its import, its register hooks, the ``check`` of what
it registers -- runs through :mod:`vdm.plugin_calls`: in a worker thread with a time bound
(``--plugin-timeout`` or ``VDM_PLUGIN_TIMEOUT``, default 10 s) and with ``sys.stdout`` sent to
stderr: a plugin that hangs
is reported as such and left behind, one that prints cannot corrupt ``list-plugins --json``, and
any exception (``KeyboardInterrupt`` and ``SystemExit`` included) is that plugin's failure. Each
registered object is checked (:func:`vdm.registry.registration_problem`) before it is kept; a bad
one fails its plugin, which then provides nothing. A check must return None or a reason string;
anything else is reported as a broken check.

API versions: a plugin module's ``VDM_API`` must be one of :data:`vdm.SUPPORTED_API_VERSIONS`; a
plugin for an older one loads, and its :attr:`PluginInfo.deprecations` (also issued as
DeprecationWarnings) name what to change. DeprecationWarnings the plugin's own import and register
hooks raise (an API-1 module it imports) are recorded there too.

What a plugin registered is attributed through pluggy: each register hook is called through the
hook implementation pluggy holds for that plugin (``get_hookimpls()``, ``plugin_name``), never
looked up on the module by name.

Conflicts: when two plugins register the same device, hypervisor or server name, plugins are taken in a
fixed order -- by entry-point name, then distribution name -- and the first one wins, unless
``VDM_PREFER`` (``name=distribution,...``) names the distribution that should provide it. Every
conflict is reported by ``vdm list-plugins``.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import pluggy

from .errors import UserError
from .hookspecs import PROJECT, PluginSpec
from .plugin_api import API1_CHANGES, REMOVED_IN_API2, api_error, import_hint  # noqa: F401  (names here before)
from .plugin_calls import (  # noqa: F401  (MAX_REASON: this module's name for it before the split)
    DEFAULT_TIMEOUT,
    MAX_REASON,
    NO_ANSWER,
    bounded,
    check_availability,
    deprecations_of,
    describe,
    printable,
)
from .registry import Command, DeviceType, HypervisorType, ServerType, registration_problem

if sys.version_info >= (3, 10):
    from importlib.metadata import EntryPoint, distributions, entry_points
else:  # pragma: no cover - Python 3.9
    from importlib_metadata import EntryPoint, distributions, entry_points

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "PluginSet",
    "load_plugins",
    "timeout_from_env",
]

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
    servers: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    #: what :attr:`availability`, :attr:`parts` and :attr:`parts_errors` return, once asked
    _availability: dict[str, Optional[str]] = field(default_factory=dict, repr=False)
    _parts: dict[str, dict[str, dict[str, Optional[str]]]] = field(default_factory=dict, repr=False)
    _parts_errors: dict[str, str] = field(default_factory=dict, repr=False)
    #: the checks and parts() calls not made yet, each recording its answer
    _pending: list[Callable[[], None]] = field(default_factory=list, repr=False)
    #: the module's ``VDM_API`` (None: not declared)
    api: Optional[int] = None
    #: what this plugin uses that is deprecated, each naming its replacement
    deprecations: list[str] = field(default_factory=list)

    @property
    def availability(self) -> dict[str, Optional[str]]:
        """Per provided name (in registration order): None (available) or the reason it is not.

        The checks (and :attr:`parts`) are asked on first read, not while loading: only
        ``list-plugins`` and :attr:`status` show them (a command checks the device types it is
        given itself), and a check may load large libraries (vdm-xen's dlopens Xen's; vdm-blk's
        parts probe libnbd and librbd) that ``vdm run`` never needs."""
        self._ask()
        return self._availability

    @property
    def parts(self) -> dict[str, dict[str, dict[str, Optional[str]]]]:
        """Per device type with optional parts (:attr:`DeviceType.parts`): group -> name -> None or
        why not (asked on first read, as :attr:`availability`)."""
        self._ask()
        return self._parts

    @property
    def parts_errors(self) -> dict[str, str]:
        """Per device type whose ``parts()`` raised, timed out or answered junk: why (in the status)."""
        self._ask()
        return self._parts_errors

    def _ask(self) -> None:
        pending, self._pending = self._pending, []
        for question in pending:
            with deprecations_of(self):
                question()

    @property
    def kinds(self) -> list[str]:
        kinds = []
        if self.hypervisors:
            kinds.append("hypervisor")
        if self.servers:
            kinds.append("server")
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
        notes = ["unavailable " + r for r in reasons]
        notes += [
            f"{part}: unavailable: {why}"
            for device, groups in self.parts.items()
            if self.availability.get(device) is None
            for names in groups.values()
            for part, why in names.items()
            if why
        ]
        notes += [f"{device} parts unknown: {why}" for device, why in self.parts_errors.items()]
        if notes:
            return "available (" + "; ".join(notes) + ")"
        return "available"


@dataclass
class PluginSet:
    """Everything the loaded plugins provide."""

    plugins: list[PluginInfo] = field(default_factory=list)
    devices: dict[str, tuple[DeviceType, PluginInfo]] = field(default_factory=dict)
    hypervisors: dict[str, tuple[HypervisorType, PluginInfo]] = field(default_factory=dict)
    servers: dict[str, tuple[ServerType, PluginInfo]] = field(default_factory=dict)
    commands: dict[str, tuple[Command, PluginInfo]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    manager: Optional[pluggy.PluginManager] = None
    #: names asked for (``--plugins``/``VDM_PLUGINS``) that no installed plugin has
    unknown: list[str] = field(default_factory=list)
    #: the time bound on each call into a plugin (seconds)
    timeout: float = DEFAULT_TIMEOUT

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

    def check(self, fn: Callable[[], Optional[str]] | None) -> Optional[str]:
        """Run a plugin's availability check within this set's time bound: None or one reason line."""
        return check_availability(fn, self.timeout)

    def ask_details(self) -> None:
        """Ask every plugin's availability checks and device parts now (``list-plugins``: while
        plugin output is sent to stderr); otherwise each plugin's are asked when first read."""
        for info in self.plugins:
            info._ask()

    def call(self, fn: Callable[[], Any]) -> tuple[Any, Optional[str]]:
        """Run other plugin code (a command's ``add_arguments``) within this set's time bound.

        :returns: ``(result, None)``, or ``(None, reason)`` when it raised anything or did not
            answer in time (it is then left running in a daemon thread).
        """
        return bounded(fn, self.timeout)


def _record_parts(info: PluginInfo, dt: DeviceType, timeout: Optional[float]) -> None:
    """Ask a device type which of its parts are usable (within the time bound); a bad answer is noted."""
    value, why = bounded(dt.parts, timeout)  # type: ignore[arg-type]
    if why is None and not (
        isinstance(value, dict)
        and all(
            isinstance(g, str)
            and isinstance(names, dict)
            and all(isinstance(n, str) and (r is None or isinstance(r, str)) for n, r in names.items())
            for g, names in value.items()
        )
    ):
        why = "parts() must return {group: {name: None or reason}}"
    if why is not None:  # shown in the plugin's status, like its other failures
        info._parts_errors[dt.name] = why
        return
    info._parts[dt.name] = {
        g: {n: (printable(r) if r else None) for n, r in names.items()} for g, names in value.items()
    }


def _dist_of(ep: EntryPoint) -> tuple[str, str, Optional[str]]:
    """(distribution name, version, None) of an entry point, "?" for what its metadata does not say;
    or ("?", "?", why) when its METADATA cannot be read (not UTF-8, not parseable). One read of
    METADATA per call (each read parses the whole file: the name and version once read it 6 times
    per plugin, 70 ms of a 260 ms start here)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?", None
    try:
        meta = dist.metadata  # (Distribution.version is this METADATA's Version)
        return meta["Name"] or "?", meta["Version"] or "?", None
    except Exception as e:
        return "?", "?", f"its distribution's METADATA cannot be read ({describe(e)})"


def _installed_entry_points() -> tuple[list[EntryPoint], list[tuple[str, str]]]:
    """The ``vdm.plugins`` entry points of the installed distributions, and ``(label, why)`` for
    each distribution whose entry points cannot be read although they name the group.

    ``importlib.metadata.entry_points()`` raises when any one installed distribution's
    entry_points.txt is corrupt (a vdm plugin's or not); then each distribution is read on its own
    (the first of a name on sys.path, as entry_points() does) so the others still load.
    """
    try:
        return list(entry_points(group=ENTRY_POINT_GROUP)), []
    except Exception:
        pass
    found: list[EntryPoint] = []
    broken: list[tuple[str, str]] = []
    seen: set[str] = set()
    for dist in distributions():
        key = getattr(dist, "_normalized_name", None)
        if isinstance(key, str):
            if key in seen:
                continue
            seen.add(key)
        try:
            found += [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        except Exception as e:
            try:
                text = dist.read_text("entry_points.txt") or ""
            except Exception:
                text = ENTRY_POINT_GROUP  # unreadable: it may be a vdm plugin, so say so
            if ENTRY_POINT_GROUP in text:
                try:
                    label = dist.metadata["Name"] or key or "?"
                except Exception:
                    label = key or "?"
                broken.append((label, f"its entry_points.txt cannot be read ({describe(e)})"))
    return found, broken


def _preferences() -> dict[str, str]:
    prefs = {}
    for item in os.environ.get("VDM_PREFER", "").split(","):
        if "=" in item:
            name, dist = item.split("=", 1)
            prefs[name.strip()] = dist.strip()
    return prefs


def timeout_from_env() -> float:
    """``VDM_PLUGIN_TIMEOUT`` in seconds (default :data:`DEFAULT_TIMEOUT`); a bad value is a UserError."""
    text = os.environ.get("VDM_PLUGIN_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise UserError(f"VDM_PLUGIN_TIMEOUT={text!r}: give a number of seconds greater than 0")
    return value


def load_plugins(
    only: Iterable[str] | None = None,
    eps: Iterable[EntryPoint] | None = None,
    timeout: float | None = None,
) -> PluginSet:
    """Load the plugins of the ``vdm.plugins`` group (or ``eps``) and collect what they provide.

    :param only: names of the plugins to load (default: ``VDM_PLUGINS`` if set, else all); names
        no installed plugin has are listed in :attr:`PluginSet.unknown`.
    :param timeout: seconds each call into a plugin may take (default: ``VDM_PLUGIN_TIMEOUT`` or
        :data:`DEFAULT_TIMEOUT`).
    """
    if only is None and os.environ.get("VDM_PLUGINS"):
        only = [n.strip() for n in os.environ["VDM_PLUGINS"].split(",") if n.strip()]
    wanted = set(only) if only is not None else None
    found, broken = (list(eps), []) if eps is not None else _installed_entry_points()
    dists = {id(ep): _dist_of(ep) for ep in found}
    found.sort(key=lambda ep: (ep.name, dists[id(ep)][0]))
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PluginSpec)
    result = PluginSet(manager=pm, timeout=timeout_from_env() if timeout is None else timeout)
    result.unknown = sorted(wanted - {ep.name for ep in found}) if wanted is not None else []
    prefs = _preferences()
    for ep in found:
        dist, version, why = dists[id(ep)]
        info = PluginInfo(ep.name, dist, version, ep.value)
        result.plugins.append(info)
        if wanted is not None and ep.name not in wanted:
            info.state = "disabled"
            continue
        if why is not None:
            info.state, info.error = "failed", why
            continue
        with deprecations_of(info):
            module, why = bounded(ep.load, result.timeout)  # sys.exit() or Ctrl-C at import: its failure
        if why is not None:
            info.state, info.error = "failed", f"import failed: {import_hint(why)}"
            continue
        info.path = str(getattr(module, "__file__", "") or "")
        why = api_error(module, info)
        if why:
            info.state, info.error = "failed", why
            continue
        plugin_name = f"{dist}:{ep.name}"
        try:
            pm.register(module, name=plugin_name)
        except pluggy.PluginValidationError as e:
            info.state, info.error = "failed", f"invalid plugin: {e}"
            continue
        except ValueError as e:  # registered twice (same module under two entry points)
            info.state, info.error = "failed", str(e)
            continue
        except Exception as e:  # what pluggy's inspection of an odd module object raises
            info.state, info.error = "failed", f"invalid plugin: {describe(e)}"
            continue
        callers = pm.get_hookcallers(module) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if unknown:
            pm.unregister(module)
            info.state = "failed"
            info.error = f"unknown hook {', '.join(unknown)} (is the plugin written for another vdm-core?)"
            continue
        info.hooks = sorted(c.name for c in callers)
        with deprecations_of(info):
            _collect(pm, plugin_name, info, result, prefs)
        for text in info.deprecations if info.state == "loaded" else []:
            # attributed to this module: shown to plugin authors (pytest, -W default), not on every vdm run
            warnings.warn(f"vdm plugin {info.name} ({info.distribution}): {text}", DeprecationWarning, 1)
    for label, why in broken:  # listed under the distribution's folder name: no entry point is known
        result.plugins.append(PluginInfo(label, label, "?", "", state="failed", error=why))
    result.plugins.sort(key=lambda p: (p.name, p.distribution))
    return result


#: the register hooks (called in name order) and what each registers
_REGISTER_HOOKS = {
    "vdm_register_devices": "devices",
    "vdm_register_hypervisors": "hypervisors",
    "vdm_register_servers": "servers",
    "vdm_register_commands": "commands",
}


def _collect(
    pm: pluggy.PluginManager, plugin_name: str, info: PluginInfo, result: PluginSet, prefs: dict[str, str]
) -> None:
    """Call the plugin's register hooks; keep what they register only if all of it is valid.

    Each hook is called through the implementation pluggy registered for ``plugin_name``, so what
    is registered is attributed to the plugin pluggy says implements the hook.
    """
    provided: list[tuple[str, Any]] = []
    problems: list[str] = []
    module = pm.get_plugin(plugin_name)
    impls = {
        caller.name: impl
        for caller in pm.get_hookcallers(module) or []
        for impl in caller.get_hookimpls()
        if impl.plugin_name == plugin_name
    }

    def call(hook_name: str, kind: str) -> None:
        hook_impl = impls.get(hook_name)
        if hook_impl is None:
            return
        fn, argnames = hook_impl.function, tuple(hook_impl.argnames)

        def register(obj: Any) -> None:
            why = registration_problem(kind, obj)
            if why:
                problems.append(f"{hook_name} {why}")
            else:
                provided.append((kind, obj))

        kwargs = {"register": register}
        _, why = bounded(lambda: fn(*[kwargs[n] for n in argnames]), result.timeout)
        if why is not None:
            timed_out = why.startswith(NO_ANSWER)
            problems.append(f"{hook_name} {why}" if timed_out else f"{hook_name} raised {why}")

    for hook_name, kind in sorted(_REGISTER_HOOKS.items()):
        if not problems:
            call(hook_name, kind)
    if problems:
        info.state, info.error = "failed", problems[0]
        pm.unregister(name=plugin_name)
        return
    def check_later(name: str, fn: Callable[[], Optional[str]] | None) -> None:
        info._availability[name] = None  # its place in the order; the answer when first read
        info._pending.append(lambda: info._availability.__setitem__(name, result.check(fn)))

    for kind, obj in provided:
        if kind == "devices":
            _add(result.devices, obj.name, obj, info, "device", result, prefs)
            info.devices.append(obj.name)
            check_later(obj.name, obj.check)
            if obj.parts is not None:  # asked when first read, as the check
                info._pending.append(functools.partial(_record_parts, info, obj, result.timeout))
        elif kind == "hypervisors":
            _add(result.hypervisors, obj.name, obj, info, "hypervisor", result, prefs)
            info.hypervisors.append(obj.name)
            check_later(obj.name, obj.check)
        elif kind == "servers":
            _add(result.servers, obj.name, obj, info, "server", result, prefs)
            info.servers.append(obj.name)
            check_later(obj.name, obj.check)
        elif kind == "commands":
            _add(result.commands, obj.name, obj, info, "command", result, prefs)
            info.commands.append(obj.name)


def _add(
    table: dict, name: str, obj: Any, info: PluginInfo, what: str, result: PluginSet, prefs: dict
) -> None:
    """Put ``obj`` in ``table`` unless an earlier plugin has ``name`` and is not the preferred one."""
    if name in table:
        other = table[name][1]
        preferred = prefs.get(name) == info.distribution
        if preferred:
            table[name] = (obj, info)
        winner = info if preferred else other
        result.conflicts.append(
            f"{what} '{name}' is provided by {other.distribution} and {info.distribution}; "
            f"using {winner.distribution} (set VDM_PREFER={name}=<distribution> to choose)"
        )
        return
    table[name] = (obj, info)
