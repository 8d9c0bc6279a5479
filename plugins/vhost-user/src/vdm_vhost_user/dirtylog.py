"""Dirty-page logging for live migration (vhost-user.rst: VHOST_F_LOG_ALL, LOG_SHMFD, SET_LOG_BASE).

While the frontend migrates the guest it copies guest RAM in passes and copies again the pages
changed since. Pages the CPU writes it tracks itself; pages the backend writes it learns from the
*dirty log*, a bitmap in a memory file the frontend hands over (SET_LOG_BASE): bit ``n`` (byte
``n // 8``, bit ``n % 8``) stands for the 4 KiB guest-physical page ``n``. The frontend reads and
clears it with atomic exchanges while the backend runs, so the backend sets bits with atomic
OR -- a plain read-modify-write could put back bits the frontend has just taken, which is harmless,
but two writers (threads of this process, or another backend sharing QEMU's log) could lose each
other's bits, which is not. The atomic OR is libatomic's ``__atomic_fetch_or_1`` through ctypes;
without libatomic vdm does not offer logging, and QEMU reports the migration blocker itself.

Invariants:

* A page is marked *after* the backend wrote it (when the request's buffers are given back, i.e.
  when the request completes, and after each used-ring update), so a pass that clears the bit
  before the write cannot miss it: the mark comes later and the page is copied again. Buffers are
  marked whole, whatever the device wrote of them.
* Pages past the end of the log are not marked and not touched (a frontend's log too small for its
  own memory table); the first such page is logged once.
* :meth:`DirtyLog.close` waits for marks in progress (a lock), so a new log from SET_LOG_BASE never
  makes a completion thread write into an unmapped one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import threading

from .faultguard import FaultWatch, map_frontend_file
from .protocol import ProtocolError

__all__ = ["LOG_PAGE", "MAX_LOG_SIZE", "DirtyLog", "atomic_or_available"]

log = logging.getLogger(__name__)

#: bytes of guest memory per bit of the log (VHOST_LOG_PAGE)
LOG_PAGE = 4096
#: the largest log accepted: 1 GiB of bitmap covers 32 TiB of guest-physical address space
MAX_LOG_SIZE = 1 << 30

_fetch_or = None


def _load_atomic_or():
    global _fetch_or
    if _fetch_or is None:
        name = ctypes.util.find_library("atomic") or "libatomic.so.1"
        try:
            lib = ctypes.CDLL(name)
            fn = lib.__atomic_fetch_or_1
        except (OSError, AttributeError):
            _fetch_or = False
        else:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
            fn.restype = ctypes.c_uint8
            _fetch_or = fn
    return _fetch_or or None


def atomic_or_available() -> bool:
    """Whether bytes of a shared log can be OR'ed atomically here (libatomic found)."""
    return _load_atomic_or() is not None


_SEQ_CST = 5  # __ATOMIC_SEQ_CST


class DirtyLog:
    """The frontend's dirty bitmap, mapped; :meth:`mark` sets the bits of a guest-physical range."""

    def __init__(self, fd: int, size: int, offset: int, watch: FaultWatch | None = None) -> None:
        """Map ``size`` bytes at ``offset`` of ``fd`` (the caller still owns ``fd``)."""
        fetch_or = _load_atomic_or()
        if fetch_or is None:
            raise ProtocolError("SET_LOG_BASE: dirty logging needs libatomic, which was not found")
        if not 0 < size <= MAX_LOG_SIZE:
            raise ProtocolError(f"SET_LOG_BASE: a log of {size} bytes (at most {MAX_LOG_SIZE})")
        if offset % mmap.ALLOCATIONGRANULARITY or offset > 1 << 62:
            raise ProtocolError(f"SET_LOG_BASE: offset {offset} is not page aligned")
        self._map, _ = map_frontend_file(fd, offset, size, watch, "SET_LOG_BASE: dirty log", from_offset=True)
        self._anchor = ctypes.c_uint8.from_buffer(self._map)  # keeps the address valid until close
        self._base = ctypes.addressof(self._anchor)
        self._fetch_or = fetch_or
        self.size = size
        self._lock = threading.Lock()
        self._closed = False
        self._warned = False
        #: pages marked so far (for logs and tests)
        self.marked = 0

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page that ``[gpa, gpa + length)`` touches."""
        if length <= 0:
            return
        first = gpa // LOG_PAGE
        last = (gpa + length - 1) // LOG_PAGE
        with self._lock:
            if self._closed:
                return
            limit = self.size * 8
            if last >= limit:
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "vhost-user: dirty log of %d bytes has no bit for guest page 0x%x; not marked",
                        self.size, max(first, limit) * LOG_PAGE,
                    )
                if first >= limit:
                    return
                last = limit - 1
            fetch_or, base = self._fetch_or, self._base
            page = first
            while page <= last:
                byte = page >> 3
                bits = 0
                while page <= last and page >> 3 == byte:
                    bits |= 1 << (page & 7)
                    page += 1
                fetch_or(base + byte, bits, _SEQ_CST)
            self.marked += last - first + 1

    def is_marked(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked (for tests; the frontend reads the file)."""
        page = gpa // LOG_PAGE
        return page < self.size * 8 and bool(self._map[page >> 3] >> (page & 7) & 1)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            del self._anchor
            try:
                self._map.close()
            except BufferError:  # pragma: no cover - a view still exported; dropped with the object
                pass
