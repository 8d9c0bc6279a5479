"""vdm-vhost-user's plugin module: the ``vhost-user`` server and the ``vdm vhost-user`` command.

vhost-user is a way of serving devices, not a hypervisor: the frontend (QEMU, ...) owns the VM and
vdm implements no VMM hook, so it registers a :class:`~vdm.registry.ServerType` (plugin API 2).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

from vdm import hookimpl
from vdm.registry import Command, ServerType

VDM_API = 2

HELP = "serve vdm devices to vhost-user frontends, one socket each (tested: QEMU 7.2 and 10.0)"


def check() -> str | None:
    """vhost-user needs Linux: Unix sockets with SCM_RIGHTS, memfd and eventfd."""
    if not sys.platform.startswith("linux"):
        return "vhost-user needs Linux"
    if not hasattr(socket, "AF_UNIX") or not hasattr(os, "memfd_create") or not hasattr(os, "eventfd"):
        return "this Python lacks AF_UNIX, memfd_create or eventfd"
    return None


def _add_arguments(parser) -> None:  # imported lazily: vdm list-plugins stays fast
    from .command import add_arguments

    add_arguments(parser)


def _run(args) -> int:
    from .command import run

    return run(args)


@hookimpl
def vdm_register_servers(register: Callable[[ServerType], None]) -> None:
    register(ServerType(name="vhost-user", check=check, help=HELP))


@hookimpl
def vdm_register_commands(register: Callable[[Command], None]) -> None:
    register(Command(name="vhost-user", help=HELP, add_arguments=_add_arguments, run=_run, available=check))
