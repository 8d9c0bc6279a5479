"""vdm-kvm's plugin module: the ``kvm`` hypervisor and the ``vdm run`` command.

Imports nothing heavy: cffi and the KVM modules load only when ``vdm run`` runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional

from vdm import hookimpl
from vdm.registry import Command, HypervisorType

VDM_API = 2


def check() -> Optional[str]:
    """Whether a Linux guest can run on this host's /dev/kvm."""
    path = "/dev/kvm"
    if not os.path.exists(path):
        return "no /dev/kvm (KVM is not enabled on this host)"
    if not os.access(path, os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm (add the user to the kvm group)"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return (
            "/dev/kvm is kvm_pvm, which cannot boot a Linux guest in useful time "
            "(use the KVM lab: scripts/kvmlab/run.sh)"
        )
    return None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .run import add_arguments

    add_arguments(p, p.get_default("plugin_set"))


def _run(args: argparse.Namespace) -> int:
    from .run import run

    return run(args)


@hookimpl
def vdm_register_hypervisors(register: Callable[[HypervisorType], None]) -> None:
    register(HypervisorType(name="kvm", check=check, help="Linux KVM: vdm creates the VM (vdm run)"))


@hookimpl
def vdm_register_commands(register: Callable[[Command], None]) -> None:
    register(
        Command(
            name="run",
            help="boot a Linux kernel in a new KVM VM with vdm's devices (like lkvm run)",
            add_arguments=_add_arguments,
            run=_run,
            available=check,
        )
    )
