"""What plugins register: device types, hypervisors, servers and commands (plain data).

A *hypervisor* (:class:`HypervisorType`) is one whose VMs a plugin drives through the VMM hooks
(KVM, Xen); a *server* (:class:`ServerType`, plugin API 2) is a way of serving devices that owns
the transport itself and implements no VMM hook (vhost-user: the frontend is the VMM).

:func:`registration_problem` is the check at the boundary: every object a plugin hands to a
``register`` callable is checked before vdm keeps it, so that a wrong one (``register(42)``, a
command without a name, a configuration that is not a dataclass, an option without dashes) fails
that plugin alone instead of every command.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .vmm import Vmm

__all__ = ["Command", "DeviceContext", "DeviceType", "HypervisorType", "ServerType", "registration_problem"]


@dataclass
class DeviceContext:
    """What a device factory gets besides its configuration."""

    #: the VM's name (for log lines and default serial numbers)
    vm_name: str = "vdm"
    #: the VM's hypervisor facade, for platform devices that register their own I/O (a UART);
    #: None where the frontend owns the transport (vhost-user)
    vmm: Optional[Vmm] = None


@dataclass
class DeviceType:
    """A kind of device a plugin provides."""

    #: short name: "blk", "net", "console"
    name: str
    #: a dataclass; its fields are the options (``--disk path,ro`` and TOML tables)
    config: type
    #: builds the device from a config: returns a VirtioDevice or a platform device
    create: Callable[[Any, DeviceContext], Any]
    #: the command-line option that adds one such device ("--disk"), and its short form ("-d")
    cli_flag: Optional[str] = None
    cli_short: Optional[str] = None
    #: the config field a bare first value sets ("path" in ``--disk disk.img,ro``)
    positional: Optional[str] = None
    #: the TOML key of this device's tables in a VM file ("disk" for ``[[disk]]``)
    toml_key: Optional[str] = None
    #: one line for --help and list-plugins
    help: str = ""
    #: None when usable, else why not (e.g. "not implemented yet")
    check: Optional[Callable[[], Optional[str]]] = None
    #: the virtio device id the devices of this type have (1 net, 2 blk, 3 console, ...), so that a
    #: toolstack's generic virtio device (Xen's ``virtio,device<ID>``) finds the plugin serving it;
    #: None when the type is not a virtio device
    virtio_id: Optional[int] = None
    #: options that make this type a virtio device where that is a choice (console's "kind=virtio");
    #: put before the user's own options when a device is asked for by its virtio id
    virtio_options: str = ""
    #: how a toolstack's disk becomes this type's options: called with the disk's ``params`` (the
    #: image or device path, as Xen's xenstore gives it) and whether it is writable, returns the
    #: option mapping for :attr:`config` (vdm-blk: ``{"path": params, "ro": not writable}``); None
    #: when the type serves no toolstack disks. ``vdm dm-only`` uses it, so it knows no field names
    from_toolstack_disk: Optional[Callable[[str, bool], dict[str, Any]]] = None
    #: the parts this type is made of that may each be usable or not, by group: returns
    #: ``{group: {name: None when usable, else the reason}}`` (vdm-blk: ``{"protocols": {"file":
    #: None, "nbd": "libnbd not found (apt install libnbd0)"}, "formats": {...}}``). ``vdm
    #: list-plugins`` calls it within the plugin time bound and shows what is unusable and why;
    #: None when the type has no optional parts
    parts: Optional[Callable[[], dict[str, dict[str, Optional[str]]]]] = None


@dataclass
class HypervisorType:
    """A hypervisor a plugin can serve devices to."""

    name: str
    #: returns None when usable here, else a one-line reason
    check: Callable[[], Optional[str]]
    help: str = ""


@dataclass
class ServerType:
    """A way of serving devices that is not a hypervisor (API 2): it implements no VMM hook.

    vhost-user is one: the frontend (QEMU, ...) owns the VM and its transport; vdm serves the
    device's queues over a socket. Registered through ``vdm_register_servers``; ``vdm list-plugins``
    lists it as kind ``server``.
    """

    name: str
    #: returns None when usable here, else a one-line reason
    check: Callable[[], Optional[str]]
    help: str = ""


@dataclass
class Command:
    """A ``vdm`` subcommand."""

    name: str
    help: str
    #: adds the command's options to its argparse subparser; the loaded
    #: :class:`vdm.plugins.PluginSet` is the parser's default ``plugin_set``
    #: (``parser.get_default("plugin_set")``, for one option per device type; API 1's
    #: ``parser.vdm_plugins`` still works and warns) and ``args.plugin_set`` when ``run`` runs
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: runs the command; returns the exit status
    run: Callable[[argparse.Namespace], int]
    #: None when the command can work here, else the reason it cannot (``vdm --help`` then marks it
    #: unavailable, ``vdm NAME --help`` shows its options and the reason, running it prints the reason)
    available: Optional[Callable[[], Optional[str]]] = None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_LONG_FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")
_SHORT_FLAG = re.compile(r"-[A-Za-z0-9]\Z")
_TOML_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_KINDS: dict[str, type] = {
    "devices": DeviceType,
    "hypervisors": HypervisorType,
    "servers": ServerType,
    "commands": Command,
}


def _text(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened; a repr that raises does not escape."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _matches(pattern: re.Pattern, value: Any) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


def _device_problem(dt: DeviceType) -> Optional[str]:
    from .config import config_class_problem, option_names

    why = config_class_problem(dt.config)
    if why:
        return why
    if not callable(dt.create):
        return "create must be callable"
    if dt.cli_flag is not None and not _matches(_LONG_FLAG, dt.cli_flag):
        return f"cli_flag {_text(dt.cli_flag)} must look like --name"
    if dt.cli_short is not None and not _matches(_SHORT_FLAG, dt.cli_short):
        return f"cli_short {_text(dt.cli_short)} must look like -x"
    if dt.positional is not None and dt.positional not in option_names(dt.config):
        return f"positional {_text(dt.positional)} is not a field of {dt.config.__name__}"
    if dt.toml_key is not None and not _matches(_TOML_KEY, dt.toml_key):
        return f"toml_key {_text(dt.toml_key)} must be a bare TOML key (letters, digits, - and _)"
    if dt.check is not None and not callable(dt.check):
        return "check must be None or callable"
    if dt.virtio_id is not None and (type(dt.virtio_id) is not int or not 0 < dt.virtio_id <= 0xFFFF):
        return f"virtio_id {_text(dt.virtio_id)} must be None or a virtio device id (1..65535)"
    if not isinstance(dt.virtio_options, str):
        return "virtio_options must be a string"
    if dt.from_toolstack_disk is not None and not callable(dt.from_toolstack_disk):
        return "from_toolstack_disk must be None or callable"
    if dt.parts is not None and not callable(dt.parts):
        return "parts must be None or callable"
    return None


def registration_problem(kind: str, obj: Any) -> Optional[str]:
    """Why ``obj``, handed to the ``register`` of hook ``vdm_register_<kind>``, is unusable, or None.

    ``kind`` is "devices", "hypervisors", "servers" or "commands". The object must be an instance of the
    matching class here, with a usable name (letters, digits, ``_.-``, not starting with ``-``),
    string help and callables where callables belong; a device type's configuration must be a
    dataclass and its options must look like options.
    """
    cls = _KINDS[kind]
    if not isinstance(obj, cls):
        return f"registered {type(obj).__name__} {_text(obj)}, not a {cls.__name__}"
    name = getattr(obj, "name", None)
    if not _matches(_NAME, name):
        return f"registered a {cls.__name__} whose name {_text(name)} is not a short name"
    if not isinstance(obj.help, str):
        return f"{cls.__name__} {name}: help must be a string"
    if isinstance(obj, DeviceType):
        why = _device_problem(obj)
    elif isinstance(obj, (HypervisorType, ServerType)):
        why = None if callable(obj.check) else "check must be callable"
    else:
        why = next(
            (
                f"{attr} must be callable"
                for attr, optional in (("add_arguments", False), ("run", False), ("available", True))
                if not callable(getattr(obj, attr)) and not (optional and getattr(obj, attr) is None)
            ),
            None,
        )
    return f"{cls.__name__} {name}: {why}" if why else None
