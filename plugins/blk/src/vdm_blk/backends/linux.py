"""Linux interfaces the raw backend needs: block-device ioctls and fallocate(2).

The ioctl numbers are built the way ``include/uapi/asm-generic/ioctl.h`` builds them
(``_IOC(dir, type, nr, size)``), from the definitions in ``include/uapi/linux/fs.h``; the
fallocate modes come from ``include/uapi/linux/falloc.h``. Python's ``os`` module has no
``fallocate`` with a mode, so it is called through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

__all__ = [
    "BLKDISCARD",
    "BLKGETSIZE64",
    "BLKIOOPT",
    "BLKPBSZGET",
    "BLKSSZGET",
    "BLKZEROOUT",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "blk_range_ioctl",
    "block_device_info",
    "fallocate",
]

# asm-generic/ioctl.h: nr 8 bits, type 8 bits, size 14 bits, direction 2 bits, in that order
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + 8
_IOC_SIZESHIFT = _IOC_TYPESHIFT + 8
_IOC_DIRSHIFT = _IOC_SIZESHIFT + 14
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return direction << _IOC_DIRSHIFT | type_ << _IOC_TYPESHIFT | nr << _IOC_NRSHIFT | size << _IOC_SIZESHIFT


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


_SIZE_T = ctypes.sizeof(ctypes.c_size_t)

# linux/fs.h
BLKSSZGET = _IO(0x12, 104)  # logical sector size (int)
BLKGETSIZE64 = _IOR(0x12, 114, _SIZE_T)  # size in bytes (u64)
BLKDISCARD = _IO(0x12, 119)  # u64 range[2]: offset, length
BLKIOOPT = _IO(0x12, 121)  # optimal I/O size (unsigned int)
BLKPBSZGET = _IO(0x12, 123)  # physical sector size (unsigned int)
BLKZEROOUT = _IO(0x12, 127)  # u64 range[2]: offset, length

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode``; raises OSError (EOPNOTSUPP when the file system lacks the mode)."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(mode=0x{mode:x}): {os.strerror(err)}")


def _ioctl_uint(fd: int, request: int, fmt: str) -> int:
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, request, buf, True)
    return struct.unpack(fmt, buf)[0]


def block_device_info(fd: int) -> tuple[int, int, int, int]:
    """(size, logical block size, physical block size, optimal I/O size) of a block device."""
    size = _ioctl_uint(fd, BLKGETSIZE64, "=Q")
    logical = _ioctl_uint(fd, BLKSSZGET, "=i")
    physical = _ioctl_uint(fd, BLKPBSZGET, "=I")
    optimal = _ioctl_uint(fd, BLKIOOPT, "=I")
    return size, logical, physical, optimal


def blk_range_ioctl(fd: int, request: int, offset: int, length: int) -> None:
    """BLKDISCARD or BLKZEROOUT over ``length`` bytes at ``offset``."""
    fcntl.ioctl(fd, request, struct.pack("=QQ", offset, length))
