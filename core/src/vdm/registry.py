"""What plugins register: device types, hypervisors and commands (plain data)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .vmm import Vmm

__all__ = ["Command", "DeviceContext", "DeviceType", "HypervisorType"]


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


@dataclass
class HypervisorType:
    """A hypervisor a plugin can serve devices to."""

    name: str
    #: returns None when usable here, else a one-line reason
    check: Callable[[], Optional[str]]
    help: str = ""


@dataclass
class Command:
    """A ``vdm`` subcommand."""

    name: str
    help: str
    #: adds the command's options to its argparse subparser; the parser carries the loaded
    #: :class:`vdm.plugins.PluginSet` as ``parser.vdm_plugins`` (for one option per device type)
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: runs the command; returns the exit status
    run: Callable[[argparse.Namespace], int]
    #: None when the command can work here, else the reason it cannot (the command is then hidden)
    available: Optional[Callable[[], Optional[str]]] = None
