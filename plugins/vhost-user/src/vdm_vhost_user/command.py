"""``vdm vhost-user``: serve one device to a vhost-user frontend (tested: QEMU 7.2 and 10.0).

The device is given like ``vdm run``'s: ``--disk disk.qcow2``, ``--network mode=tap,tapif=tap0``,
or a TOML file with one device table. vdm listens on ``--socket-path``; the frontend connects
(QEMU: ``-chardev socket,id=c0,path=PATH -device vhost-user-blk-pci,chardev=c0``). One frontend is
served at a time and the next one is accepted when it leaves. SIGTERM or SIGINT ends vdm cleanly
(the socket file is removed).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from vdm.cli.devices import add_device_options, close_devices, create_device, device_configs, devices_epilog
from vdm.config import load_toml
from vdm.device import VirtioDevice
from vdm.errors import UserError
from vdm.plugins import PluginSet
from vdm.registry import DeviceContext

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    plugins: PluginSet | None = getattr(parser, "vdm_plugins", None)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        devices_epilog(plugins)
        + "\n\nexample: vdm vhost-user --socket-path vda.sock --disk disk.qcow2"
        + "\n\ntested frontends (versions: plugins/vhost-user/README.md):"
        + "\n  QEMU 7.2 and 10.0: vhost-user-blk-pci, -netdev vhost-user + virtio-net-pci, vhost-user-rng-pci"
    )
    parser.add_argument(
        "device_file", nargs="?", metavar="DEVICE.toml", help="a TOML file with one device table"
    )
    parser.add_argument(
        "-s", "--socket-path", required=True, metavar="PATH", help="the Unix socket to listen on"
    )
    parser.add_argument("--name", default="vdm", help="name for logs and default serial numbers")
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="after the device is open and the socket listens, become this user (vdm started as root)",
    )
    add_device_options(parser, plugins)


def _one_device(args: argparse.Namespace, plugins: PluginSet) -> tuple[Any, Any]:
    doc: dict[str, Any] = {}
    base = None
    if args.device_file:
        doc = load_toml(args.device_file)
        base = os.path.dirname(os.path.abspath(args.device_file))
    configs = device_configs(args, plugins, doc, base_dir=base)
    if len(configs) != 1:
        flags = ", ".join(sorted(dt.cli_flag for dt, _ in plugins.devices.values() if dt.cli_flag))
        raise UserError(
            f"vhost-user serves exactly one device per socket; {len(configs)} given (use one of {flags})"
        )
    return configs[0]


def _check_socket_path(path: str) -> None:
    """Refuse a socket path that cannot work, before any device is opened."""
    if not path:
        raise UserError("-s/--socket-path is empty: give the path of the Unix socket to listen on")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--socket-path {path}: no such folder {folder}")
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the final NUL
        raise UserError(f"--socket-path {path}: longer than 107 bytes (use a shorter or relative path)")


def run(args: argparse.Namespace) -> int:
    """Open the device, listen, serve frontends until SIGTERM/SIGINT."""
    from .server import VhostUserServer

    _check_socket_path(args.socket_path)
    plugins: PluginSet = args.plugin_set
    dt, config = _one_device(args, plugins)
    device = create_device(dt, config, DeviceContext(vm_name=args.name, vmm=None))
    if not isinstance(device, VirtioDevice):
        close_devices([device])
        raise UserError(f"{dt.name}: this device is not a virtio device and cannot be served over vhost-user")
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    server = VhostUserServer(args.socket_path, device)
    try:
        server.start()
        if getattr(args, "user", None):
            from vdm.privileges import drop_privileges

            drop_privileges(args.user)
        print(f"vdm: serving {device.name} on {args.socket_path}", flush=True)
        while not stop.wait(1.0):
            pass
        log.info("vhost-user: signal received, shutting down")
    finally:
        server.close()
        close_devices([device])
        for s, h in old.items():
            signal.signal(s, h)
    return 0
