"""vdm-xen's plugin module: the ``xen`` hypervisor and the ``vdm dm-only`` command.

Imports nothing heavy at load: the probe dlopens the Xen libraries only when asked.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from vdm import hookimpl
from vdm.registry import Command, HypervisorType

VDM_API = 2


def check() -> Optional[str]:
    """None when ``vdm dm-only`` can work here, else why not (see :func:`vdm_xen.probe.probe`)."""
    from .probe import probe

    return probe()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .dm_only import add_arguments

    add_arguments(p)


def _run(args: argparse.Namespace) -> int:
    from .dm_only import run

    return run(args)


@hookimpl
def vdm_register_hypervisors(register: Callable[[HypervisorType], None]) -> None:
    register(
        HypervisorType(
            name="xen", check=check, help="Xen: serve devices to a guest as an IOREQ server (vdm dm-only)"
        )
    )


@hookimpl
def vdm_register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            name="dm-only",
            help="serve virtio-mmio devices to a Xen guest as an IOREQ server (devices from the "
            "command line or xenstore)",
            add_arguments=_add_arguments,
            run=_run,
            available=check,
        )
    )
