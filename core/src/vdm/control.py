"""The control socket (``--control PATH`` of ``vdm run``, ``vdm dm-only``, ``vdm vhost-user``).

JSON lines on a Unix socket, one request one reply, in QMP's shape but small::

    -> {"execute": "stats", "id": 1}
    <- {"return": {"devices": [...]}, "id": 1}
    -> {"execute": "resize", "arguments": {"device": "blk0", "size": 2147483648}}
    <- {"return": {"device": "blk0", "size": 2147483648}}

Commands: ``list`` (devices, their type, whether a driver runs them -- under vhost-user the
frontend keeps the status register, so ``status`` stays 0 there and ``running`` tells --,
driver status, features, queues), ``stats`` (per-queue
counters of :class:`~vdm.virtqueue.Virtqueue`), ``metrics`` (the same counters in the Prometheus
text exposition format 0.0.4, written here: no library needed), ``resize`` (a device that
implements :class:`Resizable`; ``size`` null re-reads the backing image's size), and any command
a device offers through :class:`Controllable` (vdm-balloon's ``balloon``): the request names the
device in ``arguments.device`` and the device's callable gets the other arguments. The client is
``vdm ctl`` (:mod:`vdm.cli.ctl`).

``add`` (``arguments.argv``: the device as ``vdm vhost-user``'s own options, ``--socket-path PATH
--disk IMG``) and ``remove`` (``arguments.device``) go to the command's :class:`Hotplug`; a command
without one (``vdm run``, ``vdm dm-only``) answers that they are not supported under it.

Devices are named by :class:`~vdm.session.DeviceSet`: their type and a number per type (``blk0``,
``blk1``, ``net0``), in the order they were given.

Invariants: the server runs on its own thread and never blocks on a client (non-blocking sockets,
one poll); a client that sends a line that is not a JSON object, an unknown command, a line over
:data:`MAX_LINE` bytes, or stops reading its replies (over :data:`MAX_PENDING` bytes queued) gets
one log line and is closed (an error reply is attempted first); the other clients and the devices
carry on. A command's own failure (a bad size) is an error reply and the client stays. The socket
is created mode 0600 and removed on :meth:`ControlServer.close`. Counters are read without locks:
a reply may be a few requests behind, never inconsistent enough to go backwards.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
from typing import Any, Callable, Protocol

from .control_report import (
    Controllable,
    Resizable,
    device_commands,
    device_list,
    device_stats,
    metrics_text,
)
from .errors import UserError
from .socket_path import check_socket_path, clear_stale_socket

__all__ = [
    "MAX_LINE",
    "MAX_PENDING",
    "ControlError",
    "ControlServer",
    "Controllable",
    "Hotplug",
    "Resizable",
    "add_control_option",
    "check_control_path",
    "metrics_text",
]

log = logging.getLogger(__name__)

#: the longest request line accepted (bytes, newline included)
MAX_LINE = 64 * 1024
#: replies queued for a client that does not read them before it is closed (bytes)
MAX_PENDING = 4 * 1024 * 1024
#: clients served at once; one more is told so and closed
MAX_CLIENTS = 32

class ControlError(Exception):
    """A command that cannot be carried out: its reply is an error, the client stays."""


def check_control_path(path: str, option: str = "--control") -> None:
    """Refuse a control socket path that cannot work, before anything is opened (a UserError)."""
    check_socket_path(path, option, "the control socket to create")
    clear_stale_socket(path, option)


def add_control_option(parser: Any) -> None:
    """``--control PATH``, the same for every command that serves devices."""
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="serve a control socket here (mode 0600) for `vdm ctl`: list, stats, metrics, resize",
    )


# ---- the server ----------------------------------------------------------------------------------


class _Client:
    __slots__ = ("inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""


class ControlServer:
    """Serves the control socket for the devices ``entries()`` returns, on its own thread.

    ``entries`` gives ``[(id, type name, device)]`` at each request (devices may come and go).
    """

    def __init__(self, path: str, entries: Callable[[], list[tuple[str, str, Any]]]) -> None:
        self.path = path
        self._entries = entries
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._inode: tuple[int, int] | None = None
        #: clients closed for a bad request or for not reading (for tests and logs)
        self.dropped = 0

    def start(self) -> ControlServer:
        check_control_path(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: the socket can resize disks
        try:
            listener.bind(self.path)
        except OSError as e:
            listener.close()
            raise UserError(f"--control {self.path}: cannot listen: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        listener.listen(8)
        listener.setblocking(False)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="vdm-control", daemon=True)
        self._thread.start()
        log.info("control socket on %s", self.path)
        return self

    def close(self) -> None:
        """Stop serving, close every client and remove the socket file (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        for c in list(self._clients.values()):
            c.sock.close()
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- the server thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        lfd = self._listener.fileno()
        while not self._closed:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            poller.register(lfd, select.POLLIN)
            for fd, c in self._clients.items():
                poller.register(fd, select.POLLIN | (select.POLLOUT if c.outbuf else 0))
            try:
                events = poller.poll()
            except InterruptedError:  # pragma: no cover - Python retries poll itself
                continue
            for fd, ev in events:
                if fd == self._wake_r:
                    return
                if fd == lfd:
                    self._accept()
                    continue
                c = self._clients.get(fd)
                if c is None:
                    continue
                try:
                    if ev & select.POLLOUT:
                        self._flush(c)
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self._read(c)
                except _Drop as e:
                    self._drop(c, str(e))
                except OSError as e:
                    self._drop(c, f"connection error: {e}")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._clients) >= MAX_CLIENTS:
            log.warning("control: more than %d clients; one refused", MAX_CLIENTS)
            sock.close()
            return
        sock.setblocking(False)
        self._clients[sock.fileno()] = _Client(sock)

    def _drop(self, c: _Client, why: str | None) -> None:
        if why:
            self.dropped += 1
            log.warning("control: client closed: %s", why)
        self._clients.pop(c.sock.fileno(), None)
        c.sock.close()

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._drop(c, None)
            return
        c.inbuf += data
        while b"\n" in c.inbuf and c.sock.fileno() in self._clients:
            line, c.inbuf = c.inbuf.split(b"\n", 1)
            self._handle(c, line)
        if len(c.inbuf) >= MAX_LINE:
            raise _Drop(f"a request line longer than {MAX_LINE} bytes")

    def _send(self, c: _Client, reply: dict[str, Any]) -> None:
        c.outbuf += json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        if len(c.outbuf) > MAX_PENDING:
            raise _Drop(f"it does not read its replies ({len(c.outbuf)} bytes waiting)")
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            c.outbuf = c.outbuf[n:]

    def _handle(self, c: _Client, line: bytes) -> None:
        if not line.strip():
            return
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            req = None
        if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
            self._refuse(c, "GenericError", 'not a request: send one JSON object per line, {"execute": ...}')
        rid = req.get("id")
        args = req.get("arguments", {})
        command = _COMMANDS.get(req["execute"])
        if command is None and self._offered(req["execute"]):
            name = req["execute"]

            def command(server: ControlServer, a: dict[str, Any]) -> Any:
                return server._device_command(name, a)

        if command is None:
            self._refuse(
                c,
                "CommandNotFound",
                f"unknown command {req['execute'][:40]!r} (one of {', '.join(_COMMANDS)})",
                rid,
            )
        if not isinstance(args, dict):
            self._refuse(c, "GenericError", "arguments must be a JSON object", rid)
        try:
            result = command(self, args)
        except ControlError as e:
            reply: dict[str, Any] = {"error": {"class": "GenericError", "desc": str(e)}}
        except Exception as e:  # a device's bug: an error reply and one log line, vdm serves on
            log.exception("control: %s failed", req["execute"])
            reply = {"error": {"class": "GenericError", "desc": f"internal error: {e!r}"}}
        else:
            reply = {"return": result}
        if rid is not None:
            reply["id"] = rid
        self._send(c, reply)

    def _refuse(self, c: _Client, cls: str, desc: str, rid: Any = None) -> None:
        reply: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
        if rid is not None:
            reply["id"] = rid
        try:
            c.sock.send(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        raise _Drop(desc)

    # ---- commands -------------------------------------------------------------------------------

    def _find(self, ident: Any) -> tuple[str, str, Any]:
        entries = self._entries()
        for e in entries:
            if e[0] == ident:
                return e
        raise ControlError(f"no device {ident!r} (devices: {', '.join(e[0] for e in entries) or 'none'})")

    def _offered(self, name: str) -> bool:
        return any(name in device_commands(e[2], _COMMANDS) for e in self._entries())

    def _device_command(self, name: str, args: dict[str, Any]) -> Any:
        ident, _, dev = self._find(args.get("device"))
        fn = device_commands(dev, _COMMANDS).get(name)
        if fn is None:
            raise ControlError(f"{ident}: this device has no command {name!r}")
        try:
            result = fn({k: v for k, v in args.items() if k != "device"})
        except (ValueError, OSError) as e:
            raise ControlError(f"{ident}: {e}") from None
        return {"device": ident, **result} if isinstance(result, dict) else result

    def _list(self, args: dict[str, Any]) -> Any:
        return {"devices": device_list(self._entries(), _COMMANDS)}

    def _stats(self, args: dict[str, Any]) -> Any:
        return {"devices": device_stats(self._entries())}

    def _metrics(self, args: dict[str, Any]) -> Any:
        return {"text": metrics_text(device_stats(self._entries()))}

    def _resize(self, args: dict[str, Any]) -> Any:
        ident, _, dev = self._find(args.get("device"))
        size = args.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise ControlError(
                f"size {size!r}: a number of bytes greater than 0 (or null to re-read the image)"
            )
        if not isinstance(dev, Resizable):
            raise ControlError(f"{ident}: this device cannot be resized")
        try:
            new = dev.resize(size)
        except (ValueError, OSError) as e:
            raise ControlError(f"{ident}: {e}") from None
        log.info("control: %s resized to %d bytes", ident, new)
        return {"device": ident, "size": new}

    # ---- hot-plug (vdm vhost-user only) ---------------------------------------------------------

    #: what ``add``/``remove`` go to; None: this command cannot add or remove devices
    _hotplug: Hotplug | None = None
    #: the command serving this socket, for the "not supported" reply
    command_name = "this command"

    def set_hotplug(self, hotplug: Hotplug | None, command_name: str) -> None:
        """Let ``add``/``remove`` reach ``hotplug`` (before :meth:`start`)."""
        self._hotplug = hotplug
        self.command_name = command_name

    def _need_hotplug(self) -> Hotplug:
        if self._hotplug is None:
            raise ControlError(
                f"not supported under {self.command_name} (only vdm vhost-user adds and removes "
                "devices while it runs; a VM's bus has no hot-plug here)"
            )
        return self._hotplug

    def _add(self, args: dict[str, Any]) -> Any:
        hotplug = self._need_hotplug()
        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ControlError(
                "give the device as on the command line, e.g. --socket-path PATH --disk IMG"
            )
        try:
            return hotplug.add(argv)
        except (UserError, ValueError, OSError) as e:
            raise ControlError(str(e)) from None

    def _remove(self, args: dict[str, Any]) -> Any:
        hotplug = self._need_hotplug()
        ident, _, _ = self._find(args.get("device"))
        try:
            return hotplug.remove(ident)
        except (UserError, ValueError, OSError) as e:
            raise ControlError(str(e)) from None


class Hotplug(Protocol):
    """What ``add``/``remove`` call (``vdm vhost-user``'s); both run on the control thread.

    Either does all of it or nothing (raising UserError/ValueError with the reason): a failed add
    leaves no device, socket or open image behind; a failed remove leaves the device served.
    """

    def add(self, argv: list[str]) -> dict[str, Any]:
        """Serve a new device given as the command's own options; return ``{"device": id, ...}``."""
        ...

    def remove(self, ident: str) -> dict[str, Any]:
        """Stop serving device ``ident``: its frontend dropped, its socket removed, it closed."""
        ...


class _Drop(Exception):
    """Close this client (the message is the log line's reason)."""


_COMMANDS: dict[str, Callable[[ControlServer, dict[str, Any]], Any]] = {
    "list": ControlServer._list,
    "stats": ControlServer._stats,
    "metrics": ControlServer._metrics,
    "resize": ControlServer._resize,
    "add": ControlServer._add,
    "remove": ControlServer._remove,
}
