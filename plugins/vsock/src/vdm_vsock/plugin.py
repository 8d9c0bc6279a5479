"""vdm-vsock's plugin module: registers the ``vsock`` device type (``--vsock``, ``[[vsock]]``).

``--vsock cid=3,path=/tmp/vm.vsock``: the guest is CID 3; vdm listens on ``/tmp/vm.vsock`` for
host programs (``CONNECT <port>\\n``) and dials ``/tmp/vm.vsock_<port>`` when the guest connects
to the host's port. The listening socket is made when the device is.
"""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType

from .config import VsockConfig

VDM_API = 2


def create(config: VsockConfig, ctx: DeviceContext):  # -> VsockDevice
    from vdm.socket_path import check_socket_path, clear_stale_socket

    from .device import VsockDevice, listen_on  # imported when a device is made: list-plugins stays fast

    check_socket_path(config.path, "--vsock path", "the Unix socket host programs connect to")
    clear_stale_socket(config.path, "--vsock path")
    try:
        listener = listen_on(config.path)
    except OSError as e:
        raise UserError(f"--vsock path={config.path}: cannot listen: {e.strerror or e}") from None
    return VsockDevice(config, listener=listener)


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="vsock",
            config=VsockConfig,
            create=create,
            cli_flag="--vsock",
            toml_key="vsock",
            help="virtio-vsock to host Unix sockets (guest port P <-> PATH_P; CONNECT P on PATH)",
            virtio_id=19,
        )
    )
