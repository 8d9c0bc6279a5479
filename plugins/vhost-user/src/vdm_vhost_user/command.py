"""``vdm vhost-user``: serve vdm devices to vhost-user frontends (tested: QEMU 7.2 and 10.0).

A device is given like ``vdm run``'s: ``--disk disk.qcow2``, ``--network mode=tap,tapif=tap0``,
or a TOML file with one device table. vdm listens on ``--socket-path``; the frontend connects
(QEMU: ``-chardev socket,id=c0,path=PATH -device vhost-user-blk-pci,chardev=c0``). One frontend is
served per socket at a time and the next one is accepted when it leaves. SIGTERM or SIGINT ends
vdm cleanly (the socket files are removed); signals and the devices' lifecycle are
:mod:`vdm.session`'s (the same as ``vdm run`` and ``vdm dm-only``).

Client mode: ``--connect PATH`` instead of ``-s PATH`` (they mix, one per device) connects to a
frontend that listens (QEMU ``-chardev socket,id=c0,path=PATH,server=on,wait=off``,
cloud-hypervisor's server mode), waits for it to appear, and connects again whenever the
connection ends (:mod:`.server`).

Several devices, one process: ``-s`` may be repeated, each followed by its one device --
``-s a.sock --disk a.img -s b.sock --disk b.qcow2`` (options before the first ``-s`` belong to it,
so the one-device form is unchanged) -- or the TOML file's device tables name their socket
(``[[disk]]`` with ``socket = "a.sock"``, or ``[[device]]`` with ``type = "disk"`` and
``socket``). Every device is served on its own socket and connection, all on one event loop
thread (``--loop-per-device``: each on an event loop thread of its own, so that one device's
requests are served while another's thread waits in a system call); a frontend that
disconnects, breaks the protocol or crashes loses only its own connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any

from vdm.cli.devices import DEST_PREFIX, add_device_options, device_configs, devices_epilog
from vdm.config import OPTION_SYNTAX_HELP, load_toml
from vdm.control import add_control_option, check_control_path
from vdm.device import VirtioDevice
from vdm.errors import UserError
from vdm.plugins import PluginSet
from vdm.registry import DeviceContext
from vdm.session import DeviceSet, StopSignal
from vdm.socket_path import check_socket_path

__all__ = ["Served", "add_arguments", "device_groups", "run"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    plugins: PluginSet | None = parser.get_default("plugin_set")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        devices_epilog(plugins)
        + "\n\n"
        + OPTION_SYNTAX_HELP
        + "\n\nexample: vdm vhost-user --socket-path vda.sock --disk disk.qcow2"
        + "\n         vdm vhost-user -s vda.sock --disk a.qcow2 -s vdb.sock --disk b.img  (two devices)"
        + "\n         vdm vhost-user -s vda.sock --disk a.img --control vdm.ctl  (vdm ctl --control vdm.ctl)"
        + "\n\ntested frontends (versions: plugins/vhost-user/README.md):"
        + "\n  QEMU 7.2 and 10.0: vhost-user-blk-pci, -netdev vhost-user + virtio-net-pci, vhost-user-rng-pci"
        + "\n  libblkio 1.5 (virtio-blk-vhost-user driver): blk"
        + "\n  DPDK 22.11 virtio-user (dpdk-testpmd --vdev net_virtio_user0,path=SOCK): net"
    )
    parser.add_argument(
        "device_file",
        nargs="?",
        metavar="DEVICE.toml",
        help="a TOML file with one device table, or device tables that each name their socket",
    )
    parser.add_argument(
        "-s",
        "--socket-path",
        action=_SocketAction,
        metavar="PATH",
        help="a Unix socket to listen on; repeat it, each followed by its device, to serve several",
    )
    parser.add_argument(
        "--connect",
        action=_SocketAction,
        dest="socket_path",
        metavar="PATH",
        help="like -s, but the frontend listens on PATH (QEMU -chardev socket,server=on,wait=off): "
        "connect to it, and again whenever the connection ends",
    )
    parser.add_argument("--name", default="vdm", help="name for logs and default serial numbers")
    parser.add_argument(
        "--loop-per-device",
        action="store_true",
        help="serve each device (its socket, messages and kicks) on an event loop thread of its own "
        "instead of one for all",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="after the device is open and the socket listens, become this user (vdm started as root)",
    )
    add_control_option(parser)
    add_device_options(parser, plugins)


class _SocketAction(argparse.Action):
    """``-s PATH``, repeatable: notes how many options of each device type came before it, so
    that the devices after it (up to the next ``-s``) are its own."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        groups = list(getattr(namespace, self.dest, None) or [])
        before = {k: len(v) for k, v in vars(namespace).items() if k.startswith(DEST_PREFIX) and v}
        groups.append((values, before))
        setattr(namespace, self.dest, groups)
        if option_string == "--connect":
            namespace.connect_paths = [*(getattr(namespace, "connect_paths", None) or []), values]


def _flags(plugins: PluginSet) -> str:
    return ", ".join(sorted(dt.cli_flag for dt, _ in plugins.devices.values() if dt.cli_flag))


def _toml_groups(doc: dict[str, Any], plugins: PluginSet, base: str | None) -> tuple[list, dict[str, Any]]:
    """Device tables that name their socket -> [(socket, type, config)]; and the rest of ``doc``."""
    by_key = {dt.toml_key: dt for dt, _ in plugins.devices.values() if dt.toml_key}
    by_type = {**by_key, **{dt.name: dt for dt, _ in plugins.devices.values()}}
    out: list[tuple[str, Any, Any]] = []
    rest: dict[str, Any] = {}
    for key, value in doc.items():
        if key != "device" and key not in by_key:
            rest[key] = value
            continue
        tables = [value] if isinstance(value, dict) else value
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UserError(f"[{key}] must be a table or an array of tables")
        kept = []
        for t in tables:
            t = dict(t)
            if key == "device":
                kind = t.pop("type", None)
                dt = by_type.get(kind) if isinstance(kind, str) else None
                if dt is None or not dt.toml_key:
                    known = ", ".join(sorted(by_key))
                    raise UserError(f"[[device]]: type = {kind!r} is not a device type (one of {known})")
            else:
                dt = by_key[key]
            sock = t.pop("socket", None)
            if sock is None:
                if key == "device":
                    raise UserError('[[device]]: give its socket = "PATH"')
                kept.append(t)
                continue
            if not isinstance(sock, str):
                raise UserError(f"[{key}] socket = {sock!r}: a path (a string)")
            if base and not os.path.isabs(sock):
                sock = os.path.join(base, sock)
            (found,) = device_configs(argparse.Namespace(), plugins, {dt.toml_key: [t]}, base_dir=base)
            out.append((sock, *found))
        if kept:
            rest[key] = kept
    return out, rest


def device_groups(args: argparse.Namespace, plugins: PluginSet) -> list[tuple[str, Any, Any]]:
    """Every ``(socket path, device type, config)`` asked for, in the order given.

    One device per socket; a socket given twice, a socket without a device or with two, is a
    :class:`UserError` saying which.
    """
    doc: dict[str, Any] = {}
    base = None
    if args.device_file:
        doc = load_toml(args.device_file)
        base = os.path.dirname(os.path.abspath(args.device_file))
    out, rest = _toml_groups(doc, plugins, base)
    sockets: list[tuple[str, dict[str, int]]] = list(getattr(args, "socket_path", None) or [])
    dests = [k for k in vars(args) if k.startswith(DEST_PREFIX)]
    ends = {k: len(getattr(args, k) or []) for k in dests}
    if not sockets and (_tables(rest) or any(ends.values())):
        raise UserError("give -s/--socket-path PATH: the Unix socket to serve the device on")
    if not sockets and not out:
        raise UserError(f"no device given (one of {_flags(plugins)} after -s/--socket-path, or a TOML file)")
    for n, (path, before) in enumerate(sockets):
        after = sockets[n + 1][1] if n + 1 < len(sockets) else ends
        part = argparse.Namespace(strict=getattr(args, "strict", False))
        for k in dests:
            lo = before.get(k, 0) if n else 0  # options before the first -s are its own
            hi = after.get(k, 0)
            setattr(part, k, (getattr(args, k) or [])[lo:hi] or None)
        table_doc = rest if len(sockets) == 1 else {}
        configs = device_configs(part, plugins, table_doc, base_dir=base)
        if len(configs) != 1:
            raise UserError(
                f"--socket-path {path}: {len(configs)} devices given; a socket serves exactly one device "
                f"(put one of {_flags(plugins)} after each -s)"
            )
        out.append((path, *configs[0]))
    if len(sockets) > 1:
        _unused_tables(rest)
    seen: set[str] = set()
    for path, _, _ in out:
        key = os.path.abspath(path)
        if key in seen:
            raise UserError(f"--socket-path {path} is given twice: each device needs its own socket")
        seen.add(key)
    return out


def _tables(doc: dict[str, Any]) -> list[str]:
    """The keys of ``doc`` that hold tables (not plain values)."""
    return [k for k, v in doc.items() if isinstance(v, dict) or (isinstance(v, list) and _all_dicts(v))]


def _all_dicts(values: list) -> bool:
    return bool(values) and all(isinstance(v, dict) for v in values)


def _unused_tables(rest: dict[str, Any]) -> None:
    tables = _tables(rest)
    if tables:
        raise UserError(
            f'[{tables[0]}] has no socket and there are several -s: give the table its socket = "PATH"'
        )


def _check_socket_path(path: str) -> None:
    """Refuse a socket path that cannot work, before any device is opened."""
    check_socket_path(path, "--socket-path", "the Unix socket to listen on")


def run(args: argparse.Namespace) -> int:
    """Open the devices, listen on their sockets, serve frontends until SIGTERM/SIGINT."""
    from vdm.eventloop import EventLoop

    plugins: PluginSet = args.plugin_set
    groups = device_groups(args, plugins)
    for path, _, _ in groups:
        _check_socket_path(path)
    if args.control:
        check_control_path(args.control)
    # closed in this order: the servers (newest first: frontends dropped, sockets removed), the
    # event loop, then the devices (newest first)
    with StopSignal() as stop, DeviceSet() as devices:
        for _path, dt, config in groups:
            name = args.name if len(groups) == 1 else f"{args.name}-{len(devices.devices)}"
            device = devices.create(dt, config, DeviceContext(vm_name=name, vmm=None))
            if not isinstance(device, VirtioDevice):
                raise UserError(
                    f"{dt.name}: this device is not a virtio device and cannot be served over vhost-user"
                )
        loop = None if args.loop_per_device else EventLoop("vdm-vhost-user")
        if loop is not None:
            devices.using(loop.stop, "the event loop")
        served = Served(devices, loop, plugins, args.name)
        devices.using(served.close, "the vhost-user servers")  # after the control socket
        clients = {os.path.abspath(c) for c in getattr(args, "connect_paths", None) or []}
        for (path, _, _), device, (ident, _) in zip(groups, list(devices.devices), list(devices.ids)):
            served.serve(ident, path, device, connect=os.path.abspath(path) in clients)
        if args.control:
            from vdm.control import ControlServer

            control = ControlServer(args.control, devices.entries)
            control.set_hotplug(served, "vdm vhost-user")
            control.start()
            devices.using(control.close, f"the control socket {args.control}")
        devices.ready(getattr(args, "user", None))
        for server in served.servers.values():
            how = "to the frontend on" if server.connect else "on"
            print(f"vdm: serving {server.device.name} {how} {server.path}", flush=True)
        stop.wait()
        log.info("vhost-user: %s received, shutting down", stop.stopped_by)
    return 0


class _AddParser(argparse.ArgumentParser):
    """The command's own parser for ``vdm ctl add``: an error is raised, never printed and exited."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UserError(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UserError((message or "").strip() or "not accepted here")


class Served:
    """The vhost-user servers of one ``vdm vhost-user``, by device id; ``vdm ctl add``/``remove``.

    Invariants: every device in the :class:`DeviceSet` that is served has exactly one server
    here; ``add`` and ``remove`` run on the control thread (one at a time) and either do all of it
    or nothing; :meth:`close` (at shutdown, after the control socket closed) closes every server.
    """

    def __init__(self, devices: DeviceSet, loop: Any, plugins: PluginSet, name: str) -> None:
        self.devices = devices
        #: the event loop every server shares; None: each server runs (and stops) its own
        self.loop = loop
        self.plugins = plugins
        self.name = name
        self.servers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def serve(self, ident: str, path: str, device: Any, connect: bool = False) -> Any:
        from .server import VhostUserServer

        server = VhostUserServer(path, device, self.loop, connect=connect).start()
        with self._lock:
            self.servers[ident] = server
        return server

    def add(self, argv: list[str]) -> dict[str, Any]:
        """``vdm ctl add --socket-path PATH --disk IMG``: parsed as on the command line."""
        parser = _AddParser(prog="vdm ctl add", add_help=False)
        parser.set_defaults(plugin_set=self.plugins)
        add_arguments(parser)
        args = parser.parse_args(argv)
        for option, value in (
            ("--control", args.control),
            ("--user", args.user),
            ("--loop-per-device", args.loop_per_device),
        ):
            if value:
                raise UserError(f"{option} is for the command line, not for a device added at run time")
        groups = device_groups(args, self.plugins)
        if len(groups) != 1:
            raise UserError(f"{len(groups)} devices given: add one at a time")
        ((path, dt, config),) = groups
        _check_socket_path(path)
        for ident, server in list(self.servers.items()):
            if os.path.abspath(server.path) == os.path.abspath(path):
                raise UserError(f"--socket-path {path}: {ident} is served there already")
        n = len(self.devices.devices)
        device = self.devices.create(dt, config, DeviceContext(vm_name=f"{args.name}-{n}", vmm=None))
        ident = self.devices.ids[-1][0]
        if not isinstance(device, VirtioDevice):
            self.devices.remove(device)
            raise UserError(f"{dt.name}: not a virtio device: it cannot be served over vhost-user")
        clients = {os.path.abspath(c) for c in getattr(args, "connect_paths", None) or []}
        connect = os.path.abspath(path) in clients
        try:
            self.serve(ident, path, device, connect=connect)
        except BaseException:
            self.devices.remove(device)
            raise
        log.info("vhost-user: %s added on %s", ident, path)
        return {"device": ident, "type": dt.name, "socket": path, "connect": connect}

    def remove(self, ident: str) -> dict[str, Any]:
        """Drop ``ident``'s frontend (the socket closes, as when a backend exits), remove its socket,
        close the device (its image lock released)."""
        with self._lock:
            server = self.servers.pop(ident, None)
        if server is None:
            raise UserError(f"{ident} is not served over vhost-user")
        server.close()
        self.devices.remove(server.device)
        log.info("vhost-user: %s removed (%s)", ident, server.path)
        return {"device": ident, "socket": server.path}

    def close(self) -> None:
        """Close every server, newest first (frontends dropped, sockets removed)."""
        with self._lock:
            servers = list(self.servers.items())
            self.servers.clear()
        for ident, server in reversed(servers):
            try:
                server.close()
            except Exception as e:
                log.error("closing the server of %s failed: %s: %s", ident, type(e).__name__, e)
