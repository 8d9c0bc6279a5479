"""A plugin module implementing every plugin hook (loaded in process by tests/core/test_hooks.py)."""

from __future__ import annotations

from dataclasses import dataclass

from vdm import hookimpl
from vdm.registry import Command, DeviceType, HypervisorType, ServerType

VDM_API = 2

#: the hooks vdm called, in order
called: list[str] = []


@dataclass
class SampleConfig:
    size: int = 0


@hookimpl
def vdm_register_devices(register):
    called.append("vdm_register_devices")
    register(DeviceType(name="sample-dev", config=SampleConfig, create=lambda c, ctx: None))


@hookimpl
def vdm_register_hypervisors(register):
    called.append("vdm_register_hypervisors")
    register(HypervisorType(name="sample-hv", check=lambda: None))


@hookimpl
def vdm_register_servers(register):
    called.append("vdm_register_servers")
    register(ServerType(name="sample-server", check=lambda: None))


@hookimpl
def vdm_register_commands(register):
    called.append("vdm_register_commands")
    register(Command(name="sample-cmd", help="", add_arguments=lambda p: None, run=lambda a: 0))
