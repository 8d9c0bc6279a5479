"""eventfd(2) on every supported Python: ``os.eventfd`` from 3.10, libc through ctypes before.

Kick and interrupt notifications (ioeventfd, irqfd, vhost-user kick and call fds) are eventfds;
this module is the one place vdm creates, reads and writes them.
"""

from __future__ import annotations

import os
import struct

__all__ = ["EFD_CLOEXEC", "EFD_NONBLOCK", "eventfd", "eventfd_read", "eventfd_write"]

EFD_CLOEXEC = getattr(os, "EFD_CLOEXEC", 0o2000000)
EFD_NONBLOCK = getattr(os, "EFD_NONBLOCK", 0o4000)
_U64 = struct.Struct("=Q")

if hasattr(os, "eventfd"):

    def eventfd(initval: int = 0, flags: int = EFD_CLOEXEC) -> int:
        """A new eventfd with counter ``initval``."""
        return os.eventfd(initval, flags)

else:  # Python 3.9
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.eventfd.argtypes = [ctypes.c_uint, ctypes.c_int]

    def eventfd(initval: int = 0, flags: int = EFD_CLOEXEC) -> int:
        """A new eventfd with counter ``initval``."""
        fd = _libc.eventfd(initval, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd


if hasattr(os, "eventfd_read"):  # 3.10+: one call, no bytes object (on an eventfd, the same answers)
    eventfd_read = os.eventfd_read
else:

    def eventfd_read(fd: int) -> int:
        """Read (and reset) the counter; raises BlockingIOError on a non-blocking fd at zero."""
        return _U64.unpack(os.read(fd, 8))[0]


def eventfd_write(fd: int, value: int = 1) -> None:
    """Add ``value`` to the counter (wakes a reader)."""
    os.write(fd, _U64.pack(value))
