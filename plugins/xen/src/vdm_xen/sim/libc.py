"""libc's ``mmap``/``munmap`` through cffi: mappings at a fixed address, as the real libraries make
them (Python's :mod:`mmap` cannot place a mapping).
"""

from __future__ import annotations

import os

import cffi

_libc_ffi = cffi.FFI()
_libc_ffi.cdef(
    "void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);"
    "int munmap(void *addr, size_t length);"
)
_libc = _libc_ffi.dlopen(None)
MAP_FIXED = 0x10
PROT_NONE = 0
_MAP_FAILED = 2**64 - 1 if _libc_ffi.sizeof("void *") == 8 else 2**32 - 1


def libc_mmap(length: int, prot: int, flags: int, fd: int, offset: int, addr: int = 0) -> int:
    p = _libc.mmap(_libc_ffi.cast("void *", addr), length, prot, flags, fd, offset)
    a = int(_libc_ffi.cast("uintptr_t", p))
    if a == _MAP_FAILED:
        raise OSError(_libc_ffi.errno, os.strerror(_libc_ffi.errno))
    return a


def libc_munmap(addr: int, length: int) -> None:
    _libc.munmap(_libc_ffi.cast("void *", addr), length)
