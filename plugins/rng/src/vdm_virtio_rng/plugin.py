"""vdm-rng's plugin module: registers the ``rng`` device type (``--rng``, ``[[rng]]``).

``--rng ""`` serves /dev/urandom; ``--rng FILE`` (or ``source=FILE``) another character device
or a regular file; ``rate=BYTES_PER_SEC[,period=MS]`` limits what the guest gets (QEMU's
virtio-rng ``max-bytes``/``period``). The source is opened when the device is made.
"""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType

from .config import RngConfig

VDM_API = 2


def create(config: RngConfig, ctx: DeviceContext):  # -> RngDevice
    from .device import RngDevice  # imported when a device is made: ``vdm list-plugins`` stays fast

    try:
        return RngDevice(config)
    except OSError as e:
        raise UserError(f"--rng {config.source}: cannot open: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"--rng {config.source}: {e}; give /dev/urandom or a regular file") from None


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="rng",
            config=RngConfig,
            create=create,
            cli_flag="--rng",
            positional="source",
            toml_key="rng",
            help="virtio-rng: the guest's /dev/hwrng from /dev/urandom or a file, optionally rate-limited",
            virtio_id=4,
        )
    )
