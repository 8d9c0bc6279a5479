"""vdm-net's plugin module: registers the ``net`` device type (``--network``, ``-n``, ``[[network]]``).

Options follow kvmtool's: ``--network mode=tap,tapif=vdmtap0,script=/etc/vdm-ifup,guest_mac=02:..,
queues=4`` (or ``--network tap,...``); ``host_ip=10.0.2.2/24`` addresses the tap and brings it up
without a script. ``mode=none`` gives a NIC whose link is down and which
drops what the guest sends. The tap is opened in vdm's own network namespace.
"""

from __future__ import annotations

from typing import Any, Callable

from vdm import hookimpl
from vdm.registry import DeviceContext, DeviceType

from .config import NetConfig

VDM_API = 2


def create(config: NetConfig, ctx: DeviceContext) -> Any:
    """Open the tap (running the up-script) and build the VirtioNet device on it."""
    from .backends.tap import open_tap
    from .config import parse_mac
    from .device import VirtioNet

    if config.mode == "none":
        return VirtioNet(config, None, mac_seed=f"{ctx.vm_name}-net")
    tap = open_tap(
        config.tapif,
        config.queues,
        fd=config.fd,
        script=config.script_path,
        downscript=config.downscript_path,
        host_mac=parse_mac(config.host_mac) if config.host_mac else None,
        host_ip=config.host_ip,
    )
    try:
        return VirtioNet(config, tap, mac_seed=f"{ctx.vm_name}-{tap.name}")
    except BaseException:
        tap.close()
        raise


def check() -> str | None:
    """Whether taps can be opened here (the device type is still listed when not)."""
    import os

    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (modprobe tun)"
    return None


def parts() -> dict[str, dict[str, Any]]:
    """Whether frames are transmitted by the compiled transmit step (issue 18) or by the Python path
    alone, with why (for list-plugins)."""
    from . import fastsend

    return {"fast path": {"compiled transmit step": None if fastsend.ACTIVE else fastsend.STATUS}}


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="net",
            config=NetConfig,
            create=create,
            cli_flag="--network",
            cli_short="-n",
            positional="mode",
            toml_key="network",
            help="virtio-net on a host tap (offloads, mergeable buffers, multi-queue)",
            check=check,
            virtio_id=1,
            parts=parts,
        )
    )
