"""Network namespaces for tests: a private namespace with a tap in it, nothing touches the host's.

::

    with NetNs() as ns:                       # ip netns add vdmtest-<random>
        tap = ns.open_tap("vdmtap0")          # vdm_net.backends.tap.open_tap, run inside the namespace
        ns.up("vdmtap0", address="10.0.2.2/24")
        sock = ns.packet_socket("vdmtap0")    # AF_PACKET, bound to the tap, in the namespace
        ns.run(["nc", "-l", "-p", "5555"])    # ip netns exec vdmtest-... nc ...

A namespace is entered per thread (``setns`` on a thread only changes that thread), so
:meth:`NetNs.call` runs a function on a short-lived thread inside the namespace; sockets and tap
fds made there stay in the namespace and can be used from any thread afterwards.
:meth:`NetNs.close` (or leaving the ``with``) stops what it started, closes what it opened and
deletes the namespace. The real-guest harness uses the same class: the guest's tap lives in the
namespace with 10.0.2.2/24, and ``ns.run`` / ``ns.popen`` start the peer side (nc, ping).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["ETH_P_ALL", "NetNs", "netns_unavailable"]

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
NETNS_DIR = "/var/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, nstype)
        return
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns add, /dev/net/tun)"
    if shutil.which("ip") is None:
        return "needs the ip command (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (modprobe tun)"
    return None


def _disable_ipv6() -> None:
    # /proc/sys/net shows the namespace of the thread that opens it
    for key in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6", "w") as f:
            f.write("1")


class NetNs:
    """A throw-away network namespace named ``<prefix>-<random>``."""

    def __init__(self, prefix: str = "vdmtest", *, ipv6: bool = False) -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self._closers: list[Callable[[], Any]] = []
        self._procs: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._deleted = False
        try:
            self.run(["ip", "link", "set", "lo", "up"])
            if not ipv6 and os.path.exists("/proc/sys/net/ipv6"):
                # no router solicitations or MLD reports: the only frames are the ones tests send
                self.call(_disable_ipv6)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    # ---- running things inside --------------------------------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NAME`` (for other harnesses' subprocesses)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30, **kw: Any):
        """Run a command in the namespace and wait; raises CalledProcessError (with its output) on failure."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        res = subprocess.run(self.argv(argv), timeout=timeout, check=False, **kw)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start a command in the namespace; it is killed (if still running) by :meth:`close`."""
        proc = subprocess.Popen(self.argv(argv), **kw)
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn(*args, **kw)`` on a thread that entered this namespace; return or raise its result."""
        out: dict[str, Any] = {}

        def body() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd, CLONE_NEWNET)
                finally:
                    os.close(fd)
                out["value"] = fn(*args, **kw)
            except BaseException as e:
                out["error"] = e

        t = threading.Thread(target=body, name=f"in-{self.name}")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    # ---- what tests need -------------------------------------------------------------------------------

    def open_tap(self, name: str = "vdmtap0", queues: int = 1, **kw: Any):
        """:func:`vdm_net.backends.tap.open_tap` inside the namespace; closed by :meth:`close`."""
        from vdm_net.backends.tap import open_tap

        tap = self.call(open_tap, name, queues, **kw)
        self._closers.append(tap.close)
        return tap

    def create_tap(self, name: str = "vdmtap0", *, multi_queue: bool = False) -> None:
        """A persistent tap made with ``ip tuntap add`` (owned by nobody until someone opens it)."""
        argv = ["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]
        self.run([*argv, "multi_queue"] if multi_queue else argv)

    def prepare_tap(
        self, name: str = "vdmtap0", *, address: str | None = "10.0.2.2/24", multi_queue: bool = False,
        mtu: int | None = None,
    ) -> None:
        """The host side for a guest: a persistent tap ``name`` with ``address``, up.

        A VMM started with :meth:`argv` (so it runs inside the namespace) then opens it by name
        (``--network mode=tap,tapif=vdmtap0``, or QEMU's ``-netdev tap,ifname=vdmtap0,script=no``);
        the link comes up when it does. Or pass it an fd from :meth:`tap_fd`.
        """
        self.create_tap(name, multi_queue=multi_queue)
        self.up(name, address=address, mtu=mtu)

    def tap_fd(self, name: str = "vdmtap0", *, multi_queue: bool = False) -> int:
        """An fd attached to tap ``name`` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), opened inside the
        namespace, for ``fd=N`` (give it to the child with ``pass_fds``); closed by :meth:`close`."""
        from vdm_net.backends import tun

        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            flags = tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR
            if multi_queue:
                flags |= tun.IFF_MULTI_QUEUE
            try:
                fcntl.ioctl(fd, tun.TUNSETIFF, tun.ifreq_flags(name, flags))
            except BaseException:
                os.close(fd)
                raise
            return fd

        fd = self.call(attach)

        def close() -> None:
            try:
                os.close(fd)
            except OSError:
                pass  # already taken over and closed by whoever got it

        self._closers.append(close)
        return fd

    def up(self, ifname: str, *, address: str | None = None, mtu: int | None = None) -> None:
        """Bring ``ifname`` up, optionally with an address (``10.0.2.2/24``) and MTU."""
        if mtu is not None:
            self.run(["ip", "link", "set", ifname, "mtu", str(mtu)])
        if address is not None:
            self.run(["ip", "addr", "add", address, "dev", ifname])
        self.run(["ip", "link", "set", ifname, "up"])

    def packet_socket(self, ifname: str, *, timeout: float = 2.0) -> socket.socket:
        """A raw AF_PACKET socket bound to ``ifname`` in the namespace (closed by :meth:`close`)."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                s.bind((ifname, ETH_P_ALL))
            except BaseException:
                s.close()
                raise
            return s

        s = self.call(make)
        s.settimeout(timeout)
        self._closers.append(s.close)
        return s

    def ifindex(self, ifname: str) -> int:
        return self.call(socket.if_nametoindex, ifname)

    def link_stats(self, ifname: str) -> dict[str, int]:
        """The interface's kernel counters: ``rx_packets``, ``tx_dropped``, ... (from ``ip -s -j link``)."""
        res = self.run(["ip", "-s", "-j", "link", "show", ifname])
        stats = json.loads(res.stdout)[0].get("stats64", {})
        return {
            f"{d}_{k}": v for d in ("rx", "tx") for k, v in stats.get(d, {}).items() if isinstance(v, int)
        }

    # ---- teardown --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill started processes, close opened fds and sockets, delete the namespace. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        while self._closers:
            try:
                self._closers.pop()()
            except Exception:
                pass
        if not self._deleted:
            self._deleted = True
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNs({self.name!r})"
