"""vdm-9p's plugin module: registers the ``9p`` device type (``--9p DIR,tag=TAG[,ro]``, ``[[9p]]``).

The share is a virtio-9p device; the guest mounts it with
``mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt``. The directory must exist and be a
directory; it is opened once, when the device is made, and everything the guest does is
resolved below that open directory (see :mod:`vdm_9p.export`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from vdm import hookimpl
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType

from .config import NinepConfig

VDM_API = 2


def _check() -> Optional[str]:
    if not os.path.isdir("/proc/self/fd"):
        return "/proc is not mounted (the 9p server reopens its own fds through /proc/self/fd)"
    return None


def create(config: NinepConfig, ctx: DeviceContext):  # -> NinepDevice
    from .device import NinepDevice

    if not os.path.isdir(config.path):
        raise UserError(f"--9p {config.path}: not a directory (give an existing directory to share)")
    try:
        return NinepDevice(config)
    except OSError as e:
        raise UserError(f"--9p {config.path}: cannot open: {e.strerror}") from None


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="9p",
            config=NinepConfig,
            create=create,
            cli_flag="--9p",
            positional="path",
            toml_key="9p",
            help="virtio-9p: share a host directory (guest: mount -t 9p -o trans=virtio TAG /mnt)",
            check=_check,
            virtio_id=9,
        )
    )
