"""vdm-rng-example's plugin module: registers the ``rng-example`` device type (``--rng-example``,
``[[rng-example]]``). Not ``rng``: that is vdm-rng's (plugins/rng), the full device this example
is the minimal form of, and the two can be installed side by side."""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.registry import DeviceContext, DeviceType

from .config import RngConfig

#: The vdm-core plugin API this plugin was written for.
VDM_API = 2


def create(config: RngConfig, ctx: DeviceContext):  # -> RngDevice
    from .device import RngDevice  # imported when a device is made: ``vdm list-plugins`` stays fast

    return RngDevice(config)


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="rng-example",
            config=RngConfig,
            create=create,
            cli_flag="--rng-example",
            toml_key="rng-example",
            help="virtio-rng: random numbers for the guest's /dev/hwrng (from os.urandom)",
            virtio_id=4,
        )
    )
