"""vdm-balloon's plugin module: registers the ``balloon`` device type (``--balloon``, ``[[balloon]]``)."""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.registry import DeviceContext, DeviceType

from .config import BalloonConfig

VDM_API = 2


def create(config: BalloonConfig, ctx: DeviceContext):  # -> BalloonDevice
    from .device import BalloonDevice

    return BalloonDevice(config)


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="balloon",
            config=BalloonConfig,
            create=create,
            cli_flag="--balloon",
            toml_key="balloon",
            help="virtio-balloon: the guest gives memory back on request (stats, free page reporting)",
            virtio_id=5,
        )
    )
