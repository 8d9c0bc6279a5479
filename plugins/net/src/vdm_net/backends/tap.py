"""The tap backend: a host tap interface opened through /dev/net/tun, one fd per queue pair.

:func:`open_tap` opens an existing tap by name or creates one (IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR, plus IFF_MULTI_QUEUE for several queues), or takes over an fd someone passed in,
sets the 12-byte virtio 1.0 header, makes the fds non-blocking and runs the optional up-script
with the tap name as its argument (like kvmtool and QEMU).

The tap is created in the network namespace of the calling thread; tests open it from a thread
that entered a test namespace (see ``tests/net/netns.py``). The fds keep working from any thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import subprocess
import threading
from typing import Sequence

from ..vnet_hdr import HDR_LEN
from . import tun

__all__ = ["OFFLOAD_PROBES", "Tap", "TapError", "open_tap"]

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
SCRIPT_TIMEOUT = 30.0

#: the TUNSETOFFLOAD combinations probed, each with the flag it proves the tap accepts
OFFLOAD_PROBES: Sequence[tuple[int, int]] = (
    (tun.TUN_F_CSUM, tun.TUN_F_CSUM),
    (tun.TUN_F_CSUM | tun.TUN_F_TSO4, tun.TUN_F_TSO4),
    (tun.TUN_F_CSUM | tun.TUN_F_TSO6, tun.TUN_F_TSO6),
    (tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO_ECN, tun.TUN_F_TSO_ECN),
    (tun.TUN_F_CSUM | tun.TUN_F_UFO, tun.TUN_F_UFO),
)


class TapError(OSError):
    """The tap could not be opened or configured; the message says why and what to do."""


def _ioctl_int(fd: int, request: int, value: int) -> None:
    """An ioctl whose argument points at an int."""
    fcntl.ioctl(fd, request, struct.pack("i", value))


class Tap:
    """An open tap interface: its name and one non-blocking fd per queue."""

    def __init__(
        self, name: str, fds: list[int], *, multi_queue: bool, downscript: str | None = None
    ) -> None:
        self.name = name
        self.fds = fds
        self.multi_queue = multi_queue
        self.downscript = downscript
        self._offload = 0
        self._lock = threading.Lock()
        self._closed = False
        self.accepted_offloads = self.probe_offloads()

    @property
    def queues(self) -> int:
        return len(self.fds)

    # ---- offloads --------------------------------------------------------------------------------

    def try_offload(self, flags: int) -> bool:
        """Ask the tap for ``flags`` (TUN_F_*); True if the kernel accepted them (and they are now set)."""
        try:
            # the argument is the flags themselves, not a pointer to them
            fcntl.ioctl(self.fds[0], tun.TUNSETOFFLOAD, flags)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False
        self._offload = flags
        return True

    def probe_offloads(self) -> int:
        """The TUN_F_* flags this tap accepts, each tried on its own; leaves offloads off."""
        accepted = 0
        for flags, proves in OFFLOAD_PROBES:
            if self.try_offload(flags):
                accepted |= proves
        self.set_offload(0)
        return accepted

    def set_offload(self, flags: int) -> None:
        """Tell the tap which offloads its reader (the guest) can take: TUNSETOFFLOAD."""
        with self._lock:
            if not self.try_offload(flags):
                raise TapError(errno.EINVAL, f"tap {self.name} refused offload flags 0x{flags:x}")

    @property
    def offload(self) -> int:
        """The TUN_F_* flags currently set."""
        return self._offload

    # ---- queues ------------------------------------------------------------------------------------

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """Attach or detach queue ``index`` (TUNSETQUEUE): the kernel steers frames only to attached ones."""
        if not self.multi_queue:
            return
        flags = tun.IFF_ATTACH_QUEUE if enabled else tun.IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fds[index], tun.TUNSETQUEUE, tun.ifreq_flags("", flags))
        except OSError as e:
            # attaching an attached queue (or detaching a detached one) answers EINVAL
            if e.errno != errno.EINVAL:
                raise

    # ---- teardown ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the fds and run the down-script. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.downscript:
            # while the tap still exists (a script may take it off a bridge); a failure is only logged
            try:
                _run_script(self.downscript, self.name, "down-script")
            except TapError as e:
                log.warning("%s", e)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, queues={self.queues})"


def _tunsetiff(name: str | None, flags: int) -> tuple[int, str]:
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, tun.TUNSETIFF, tun.ifreq_flags(name or "", flags))
    except BaseException:
        os.close(fd)
        raise
    return fd, tun.ifreq_name(buf)


def _explain(e: OSError, name: str | None, multi_queue: bool) -> TapError:
    what = f"tap {name}" if name else "a new tap"
    if e.errno == errno.EPERM:
        return TapError(e.errno, f"cannot open {what}: permission denied (needs CAP_NET_ADMIN, or a tap "
                                 "created for this user with 'ip tuntap add NAME mode tap user USER')")
    if e.errno == errno.EBUSY:
        return TapError(e.errno, f"cannot open {what}: it is in use by another process (a single-queue tap "
                                 "takes one opener)")
    if e.errno == errno.EINVAL and name:
        kind = "multi-queue" if multi_queue else "single-queue"
        return TapError(e.errno, f"cannot open {what} as a {kind} tap: it exists with other flags (a tun "
                                 "device, or created with/without multi_queue)")
    if e.errno == errno.ENOENT:
        return TapError(e.errno, f"cannot open {TUN_DEVICE}: the tun module is not loaded (modprobe tun)")
    return TapError(e.errno or errno.EIO, f"cannot open {what}: {e.strerror or e}")


def _configure_fd(fd: int) -> None:
    _ioctl_int(fd, tun.TUNSETVNETHDRSZ, HDR_LEN)
    try:
        # virtio 1.0 headers are little endian; a no-op on little-endian hosts
        _ioctl_int(fd, tun.TUNSETVNETLE, 1)
    except OSError as e:
        if e.errno != errno.EINVAL or struct.pack("=H", 1) != b"\x01\x00":
            raise
    os.set_blocking(fd, False)


def _run_script(script: str, name: str, what: str) -> None:
    try:
        res = subprocess.run(
            [script, name], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TapError(errno.EIO, f"{what} {script} {name} failed: {e}") from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise TapError(
            errno.EIO,
            f"{what} {script} {name} exited with status {res.returncode}"
            + (f": {detail[-1]}" if detail else ""),
        )


def _adopt_fd(fd: int) -> tuple[str, bool]:
    try:
        buf = fcntl.ioctl(fd, tun.TUNGETIFF, bytes(tun.IFREQ_SIZE))
    except OSError as e:
        raise TapError(
            e.errno or errno.EBADF, f"fd {fd} is not an attached tun/tap device ({e.strerror})"
        ) from None
    name, flags = tun.ifreq_name(buf), tun.ifreq_get_flags(buf)
    needed = (("IFF_TAP", tun.IFF_TAP), ("IFF_NO_PI", tun.IFF_NO_PI), ("IFF_VNET_HDR", tun.IFF_VNET_HDR))
    missing = [n for n, f in needed if not flags & f]
    if missing:
        raise TapError(errno.EINVAL, f"fd {fd} (interface {name}) was opened without {', '.join(missing)}")
    return name, bool(flags & tun.IFF_MULTI_QUEUE)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
IFF_UP = 0x1


def parse_cidr(text: str) -> tuple[str, int]:
    """``"10.0.2.2/24"`` -> (``"10.0.2.2"``, 24); ValueError if it is not an IPv4 address/prefix."""
    addr, _, prefix = text.partition("/")
    try:
        socket.inet_aton(addr)
        bits = int(prefix) if prefix else 24
    except (OSError, ValueError):
        raise ValueError(f"'{text}' is not an IPv4 address with a prefix length (10.0.2.2/24)") from None
    if addr.count(".") != 3 or not 0 < bits <= 32:
        raise ValueError(f"'{text}' is not an IPv4 address with a prefix length (10.0.2.2/24)")
    return addr, bits


def _ifreq_addr(name: str, addr: str) -> bytes:
    sin = struct.pack("HH4s", socket.AF_INET, 0, socket.inet_aton(addr)).ljust(16, b"\0")
    return struct.pack(f"{tun.IFNAMSIZ}s16s", name.encode(), sin).ljust(tun.IFREQ_SIZE, b"\0")


def set_ipv4(name: str, cidr: str) -> None:
    """Give interface ``name`` the address ``cidr`` and bring it up (what kvmtool does without a
    script), in the calling thread's network namespace."""
    addr, bits = parse_cidr(cidr)
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCSIFADDR, _ifreq_addr(name, addr))
        fcntl.ioctl(s.fileno(), SIOCSIFNETMASK, _ifreq_addr(name, mask))
        req = tun.ifreq_flags(name, 0)
        flags = tun.ifreq_get_flags(fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, tun.ifreq_flags(name, flags | IFF_UP))


def set_mac(name: str, mac: bytes) -> None:
    """Set interface ``name``'s MAC address (SIOCSIFHWADDR), in the calling thread's namespace."""
    req = struct.pack(f"{tun.IFNAMSIZ}sH6s", name.encode(), ARPHRD_ETHER, mac).ljust(tun.IFREQ_SIZE, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, req)


def open_tap(
    name: str | None = None,
    queues: int = 1,
    *,
    fd: int | None = None,
    script: str | None = None,
    downscript: str | None = None,
    host_mac: bytes | None = None,
    host_ip: str | None = None,
) -> Tap:
    """Open (or create) tap ``name`` with ``queues`` queues, or take over the tap ``fd``.

    ``host_mac`` and ``host_ip`` (``10.0.2.2/24``: the address is set and the tap brought up)
    configure the host side before the up-script runs. A passed-in ``fd`` belongs to the returned
    :class:`Tap` (closed by :meth:`Tap.close`); if it is refused (not a tap, no IFF_VNET_HDR) it
    stays open and the caller's.

    Raises :class:`TapError` with a message that says what went wrong and how to fix it.
    """
    if queues < 1:
        raise ValueError("queues must be at least 1")
    fds: list[int] = []
    try:
        if fd is not None:
            if queues != 1:
                raise ValueError("a passed-in fd is one queue")
            tap_name, multi_queue = _adopt_fd(fd)
            fds.append(fd)
        else:
            multi_queue = queues > 1
            base = tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR
            try:
                first, tap_name = _tunsetiff(name, base | (tun.IFF_MULTI_QUEUE if multi_queue else 0))
            except OSError as e:
                if not (e.errno == errno.EINVAL and name and not multi_queue):
                    raise _explain(e, name, multi_queue) from None
                # an existing multi-queue tap opened for one queue: open it as what it is
                try:
                    first, tap_name = _tunsetiff(name, base | tun.IFF_MULTI_QUEUE)
                except OSError:
                    raise _explain(e, name, multi_queue) from None
                multi_queue = True
            fds.append(first)
            for _ in range(queues - 1):
                try:
                    fds.append(_tunsetiff(tap_name, base | tun.IFF_MULTI_QUEUE)[0])
                except OSError as e:
                    raise _explain(e, tap_name, True) from None
        for f in fds:
            _configure_fd(f)
        if host_mac is not None:
            set_mac(tap_name, host_mac)
        if host_ip is not None:
            set_ipv4(tap_name, host_ip)
        tap = Tap(tap_name, fds, multi_queue=multi_queue, downscript=downscript)
    except BaseException:
        for f in fds:
            os.close(f)
        raise
    if script:
        try:
            _run_script(script, tap_name, "up-script")
        except BaseException:
            tap.downscript = None
            tap.close()
            raise
    log.info("tap %s open: %d queue(s), offloads 0x%x accepted", tap_name, queues, tap.accepted_offloads)
    return tap
