"""The /dev/net/tun interface: ioctl numbers, flags and ``struct ifreq``, as in <linux/if_tun.h>.

The ioctl numbers are computed the way the kernel headers compute them (``_IOW('T', 202, int)``
and so on) instead of being written down as magic numbers; ``tests/net/test_tun.py`` compiles a
small C program against the installed linux-libc-dev headers and compares every value.
"""

from __future__ import annotations

import platform
import struct

__all__ = [
    "IFF_ATTACH_QUEUE",
    "IFF_DETACH_QUEUE",
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "IFNAMSIZ",
    "TUNGETFEATURES",
    "TUNGETIFF",
    "TUNGETVNETHDRSZ",
    "TUNSETIFF",
    "TUNSETOFFLOAD",
    "TUNSETQUEUE",
    "TUNSETVNETHDRSZ",
    "TUNSETVNETLE",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_UFO",
    "ifreq_flags",
    "ifreq_name",
    "ioc",
]

# ---- the _IOC encoding (include/uapi/asm-generic/ioctl.h and the arch overrides) ----------------

_MACHINE = platform.machine().lower()
if _MACHINE.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
    # 13 size bits, 3 direction bits; NONE=1, READ=2, WRITE=4
    _IOC_SIZEBITS, _IOC_NONE, _IOC_WRITE, _IOC_READ = 13, 1, 4, 2
else:
    _IOC_SIZEBITS, _IOC_NONE, _IOC_WRITE, _IOC_READ = 14, 0, 1, 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_SIZEOF_INT = 4


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``."""
    return (
        direction << _IOC_DIRSHIFT
        | size << _IOC_SIZESHIFT
        | ord(kind) << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
    )


def _iow(kind: str, nr: int, size: int = _SIZEOF_INT) -> int:
    return ioc(_IOC_WRITE, kind, nr, size)


def _ior(kind: str, nr: int, size: int = _SIZEOF_INT) -> int:
    return ioc(_IOC_READ, kind, nr, size)


# ---- ioctls (the argument is an int or unsigned int, hence size 4) ---------------------------------

TUNSETIFF = _iow("T", 202)
TUNGETFEATURES = _ior("T", 207)
TUNSETOFFLOAD = _iow("T", 208)
TUNGETIFF = _ior("T", 210)
TUNGETVNETHDRSZ = _ior("T", 215)
TUNSETVNETHDRSZ = _iow("T", 216)
TUNSETQUEUE = _iow("T", 217)
TUNSETVNETLE = _iow("T", 220)

# ---- TUNSETIFF flags ----------------------------------------------------------------------------

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400

# ---- TUNSETOFFLOAD flags: what the reader of the tap accepts -----------------------------------

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# ---- struct ifreq ---------------------------------------------------------------------------------

IFNAMSIZ = 16
#: sizeof(struct ifreq): the name plus a union whose largest member is a struct ifmap (24 bytes
#: on 64-bit hosts, 16 on 32-bit ones)
IFREQ_SIZE = IFNAMSIZ + (24 if struct.calcsize("P") == 8 else 16)


def ifreq_flags(name: str, flags: int) -> bytes:
    """A ``struct ifreq`` with ``ifr_name`` and ``ifr_flags`` set, for TUNSETIFF / TUNSETQUEUE."""
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    return struct.pack(f"{IFNAMSIZ}sH", raw, flags).ljust(IFREQ_SIZE, b"\0")


def ifreq_name(buf: bytes) -> str:
    """``ifr_name`` of a ``struct ifreq`` the kernel filled in."""
    return buf[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def ifreq_get_flags(buf: bytes) -> int:
    """``ifr_flags`` of a ``struct ifreq``."""
    return struct.unpack_from("H", buf, IFNAMSIZ)[0]
