"""vdm-hello's plugin module: registers the ``hello`` device type (``--hello``, ``[[hello]]``)."""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.registry import DeviceContext, DeviceType

from .config import HelloConfig

#: The vdm-core plugin API this plugin was written for; vdm skips the plugin (and says why) if
#: the installed vdm-core provides another one.
VDM_API = 1


def create(config: HelloConfig, ctx: DeviceContext):
    """Build one device from its options (called by ``vdm run --hello ...`` and friends)."""
    from .device import HelloDevice  # imported here, not at the top: ``vdm list-plugins`` stays fast

    return HelloDevice(config)


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="hello",
            config=HelloConfig,
            create=create,
            cli_flag="--hello",
            toml_key="hello",
            help="hello: a virtio device made by vdm new-plugin",
        )
    )
