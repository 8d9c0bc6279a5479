"""Giving guest pages back to the host: ``madvise`` on the host mapping of guest RAM.

A guest page is released by mapping it through the device's :class:`~vdm.memory.GuestMemory`
(bounds-checked: nothing outside guest RAM) and advising the kernel on the host pages that lie
wholly inside it: ``MADV_REMOVE`` first (guest RAM in shared memory -- a memfd, as vhost-user and
``vdm run`` use -- frees its pages only so), then ``MADV_DONTNEED`` (private anonymous memory).
The guest reads zeros there afterwards, as from a fresh page. Memory that refuses both (a Xen
foreign mapping, a bytes object) is not released: the call says so and the balloon still counts
the page as the guest's gift.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

from vdm.memory import GuestMemory, GuestMemoryError

__all__ = ["PAGE", "release_range", "release_view"]

PAGE = 4096
_HOST_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _advise(view: memoryview) -> int:
    """Bytes of host pages wholly inside ``view`` that the kernel dropped (0: none)."""
    if view.readonly or len(view) == 0:
        return 0
    base = ctypes.addressof(ctypes.c_char.from_buffer(view))
    start = -(-base // _HOST_PAGE) * _HOST_PAGE
    end = (base + len(view)) // _HOST_PAGE * _HOST_PAGE
    if end <= start:
        return 0
    for advice in (_MADV_REMOVE, _MADV_DONTNEED):
        if _libc.madvise(ctypes.c_void_p(start), end - start, advice) == 0:
            return end - start
    return 0


def release_range(memory: GuestMemory, addr: int, length: int) -> bool:
    """Release guest RAM ``[addr, addr+length)``; False when it is not all guest RAM or the host
    cannot drop it. Raises nothing."""
    try:
        view = memory.map(addr, length, writable=True)
    except (GuestMemoryError, ValueError, OverflowError):
        return False
    try:
        return _advise(view) == length
    except (TypeError, ValueError, OSError):
        return False
    finally:
        memory.unmap(view)


def release_view(view: memoryview) -> int:
    """Release the host pages wholly inside ``view`` (a writable buffer the guest handed over);
    returns how many bytes were dropped."""
    try:
        return _advise(view)
    except (TypeError, ValueError, OSError):
        return 0
