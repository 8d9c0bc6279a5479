"""Shared memory the frontend may shrink after handing it over: seal it, or survive the SIGBUS.

A frontend's memory file is mapped MAP_SHARED. If the frontend later shrinks the file
(``ftruncate``), every access to a page past the new end raises SIGBUS in vdm -- a process-killing
signal that Python cannot resume from on its own. The size check at map time cannot prevent it;
two things can, and vdm uses the first where the file allows it and the second otherwise:

1. **A seal** (:func:`seal_against_shrinking`): a memfd created with ``MFD_ALLOW_SEALING`` accepts
   ``F_ADD_SEALS F_SEAL_SHRINK``; from then on nobody (the frontend included) can shrink it, and the
   kernel enforces it. QEMU's ``memory-backend-memfd`` seals its memfds itself by default
   (``seal=on``: grow, shrink and seal); a memfd that is not sealed yet and still allows seals is
   sealed here. This costs nothing at access time.
2. **A SIGBUS guard** (:class:`FaultWatch`, :func:`guard`) for everything that cannot be sealed: a
   plain file or a hugetlbfs file (QEMU's ``memory-backend-file,share=on``), or a memfd made
   without ``MFD_ALLOW_SEALING``. Refusing those would refuse common QEMU set-ups. A process-wide
   SIGBUS handler (installed through libc ``sigaction`` with ctypes, once, when the first unsealed
   region is mapped) looks at the faulting address: inside a guarded mapping, it maps anonymous
   zero pages over the rest of that mapping (``MAP_FIXED``), counts the fault on the mapping's
   :class:`FaultWatch` and writes to the watch's eventfd; the access is then retried and completes
   on the zero pages. The backend watches that eventfd on its event loop and closes the connection
   with one log line. A SIGBUS anywhere else puts the previous handler back and returns, so the
   retried access meets it (Python's faulthandler, or the default action) exactly as before.

Why this shape: QEMU's own ``os_mem_prealloc`` catches SIGBUS with a handler and
``sigsetjmp``/``siglongjmp``; libvhost-user and rust-vmm's vm-memory check the file size when they
map and otherwise trust the frontend; the kernel's answer to "nobody may shrink this" is the memfd
seal. Python can neither ``siglongjmp`` out of an access nor run a handler in C without a compiler,
so the guard repairs the mapping instead of unwinding: the retried access sees zeros (never another
process's memory or anything outside the guest), the device may see garbage for that one request,
and the connection ends. The handler runs as a ctypes callback on the faulting thread: a Python
access holds the GIL; vdm.fastpath's compiled walk and serve step (and vdm-blk's, which reads the
request header and writes the status byte) run with the GIL released, and the callback takes it
before it runs, as any ctypes callback does (tests/vhost_user/test_hostile_frontend.py's shrunk-
memory tests pass with them built and with VDM_FASTPATH=0). The kernel's own accesses -- preadv, writev --
return EFAULT instead of raising SIGBUS. The mapping cannot be unmapped meanwhile because the
faulting access holds a buffer export of it. Its libc calls (mmap, write, sigaction) go through
:class:`ctypes.PyDLL` so that the GIL is not released inside the handler.

Invariant: a guarded range is registered from the moment its mapping exists until the mapping
object is collected (a weakref finalizer unregisters it); the registry is a tuple replaced whole,
so the handler never sees it half-updated. Where the guard cannot be installed (an unknown
``struct sigaction`` layout: only Linux x86_64 and aarch64 are known), :func:`guard` raises
:class:`GuardUnavailable` and the caller refuses the unsealable file with a clear message.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import signal
import stat
import sys
import threading
import weakref

from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd

__all__ = [
    "FaultWatch",
    "GuardUnavailable",
    "guard",
    "is_guarded",
    "map_frontend_file",
    "protect",
    "seal_against_shrinking",
]

_PAGE = mmap.PAGESIZE
_SA_SIGINFO = 4
_SI_ADDR_OFFSET = 16  # siginfo_t: signo, errno, code, padding, then the union (si_addr for SIGBUS)


class GuardUnavailable(Exception):
    """No SIGBUS guard on this platform: unsealable memory files cannot be accepted."""


def seal_against_shrinking(fd: int) -> bool:
    """Whether ``fd`` can no longer shrink (sealed already, or sealed now). False if it cannot be
    sealed (not a memfd, or a memfd made without MFD_ALLOW_SEALING)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: a file system without seals
        return False
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


class FaultWatch:
    """Faults caught in the mappings of one connection: a count and an eventfd to wake a loop."""

    def __init__(self) -> None:
        self.faults = 0
        self.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)


class _Sigaction(ctypes.Structure):
    # glibc and musl on x86_64 and aarch64: handler, a 1024-bit mask, flags, restorer
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * 16),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


class _Range:
    __slots__ = ("end", "start", "watch")

    def __init__(self, start: int, end: int, watch: FaultWatch) -> None:
        self.start, self.end, self.watch = start, end, watch


_ranges: tuple[_Range, ...] = ()
_lock = threading.Lock()
_installed = False
_previous = _Sigaction()
_one = ctypes.c_uint64(1)
_libc: ctypes.PyDLL | None = None
_handler_ref = None  # the ctypes callback object must live as long as it is installed


def _on_sigbus(signo: int, info: int | None, context: int | None) -> None:
    addr = ctypes.c_size_t.from_address(info + _SI_ADDR_OFFSET).value if info else 0
    libc = _libc
    assert libc is not None
    for r in _ranges:
        if r.start <= addr < r.end:
            page = addr - addr % _PAGE
            libc.mmap(
                page,
                r.end - page,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10,  # MAP_FIXED
                -1,
                0,
            )
            r.watch.faults += 1
            libc.write(r.watch.fd, ctypes.addressof(_one), 8)
            return
    # not a guarded mapping: the previous handler (or the default action) meets the retried access
    libc.sigaction(signal.SIGBUS, ctypes.byref(_previous), None)


def _install() -> None:
    global _installed, _libc, _handler_ref
    if _installed:
        return
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        raise GuardUnavailable(f"no SIGBUS guard for {sys.platform}/{platform.machine()}")
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        c_int = ctypes.c_int
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, c_int, c_int, c_int, ctypes.c_long]
        libc.mmap.restype = ctypes.c_void_p
        libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        libc.write.restype = ctypes.c_ssize_t
        libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.POINTER(_Sigaction)]
        libc.sigaction.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        raise GuardUnavailable(f"libc: {e}") from None
    _libc = libc
    handler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(_on_sigbus)
    action = _Sigaction()
    action.handler = ctypes.cast(handler, ctypes.c_void_p).value
    action.flags = _SA_SIGINFO
    if libc.sigaction(signal.SIGBUS, ctypes.byref(action), ctypes.byref(_previous)) != 0:
        err = ctypes.get_errno()
        raise GuardUnavailable(f"sigaction: {os.strerror(err)}")
    _handler_ref = handler
    _installed = True


def _unregister(entry: _Range) -> None:
    global _ranges
    with _lock:
        _ranges = tuple(r for r in _ranges if r is not entry)


def guard(mapping: mmap.mmap, watch: FaultWatch) -> None:
    """Catch SIGBUS in ``mapping`` for as long as it exists; faults are counted on ``watch``.

    Raises GuardUnavailable where no guard can be installed.
    """
    global _ranges
    with _lock:
        _install()
        anchor = ctypes.c_char.from_buffer(mapping)
        start = ctypes.addressof(anchor)
        del anchor  # releases the buffer export again
        entry = _Range(start, start + len(mapping), watch)
        _ranges = (*_ranges, entry)
    weakref.finalize(mapping, _unregister, entry)


def protect(fd: int, watch: FaultWatch | None, what: str) -> bool:
    """Seal ``fd`` against shrinking if it can be (True); else check that it can be guarded (False:
    the caller maps it and calls :func:`guard`). ProtocolError when neither is possible.

    Call it before checking the file's size: once sealed, the size checked is the size that stays.
    """
    from .protocol import ProtocolError

    if seal_against_shrinking(fd):
        return True
    if watch is None:
        raise ProtocolError(f"{what}: the file can be shrunk under vdm and is not guarded")
    try:
        with _lock:
            _install()
    except GuardUnavailable as e:
        raise ProtocolError(
            f"{what}: the file cannot be sealed against shrinking and there is {e}; "
            "share guest memory as a memfd (QEMU: memory-backend-memfd)"
        ) from None
    return False


def map_frontend_file(
    fd: int,
    offset: int,
    length: int,
    watch: FaultWatch | None,
    what: str,
    *,
    devices: bool = False,
    from_offset: bool = False,
) -> tuple[mmap.mmap, bool]:
    """Map a file a frontend handed over, read-write and shared; returns (mapping, sealed).

    One order for every such file (guest memory, the inflight region, the dirty log): seal it or
    make sure it can be guarded (:func:`protect`), then check -- on the size that now stays -- that
    it is a regular file holding ``[offset, offset + length)`` (``devices``: a block or character
    device is accepted too, unchecked), map it, and guard the mapping if it was not sealed. The
    mapping covers ``[0, offset + length)``, or only ``[offset, offset + length)`` with
    ``from_offset`` (``offset`` page aligned: the caller checked). The caller still owns ``fd``.
    Every refusal is a ProtocolError starting with ``what``.
    """
    from .protocol import ProtocolError

    end = offset + length
    try:
        sealed = protect(fd, watch, what)
        st = os.fstat(fd)
    except OSError as e:
        raise ProtocolError(f"{what}: {e}") from None
    regular = stat.S_ISREG(st.st_mode)
    if not (regular or (devices and (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)))):
        raise ProtocolError(f"{what}: the fd is not a file that can be mapped")
    if regular and st.st_size < end:
        raise ProtocolError(
            f"{what}: 0x{length:x} bytes at file offset 0x{offset:x} are past the end of its file "
            f"(0x{st.st_size:x} bytes)"
        )
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    try:
        if from_offset:
            m = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)
        else:
            m = mmap.mmap(fd, end, mmap.MAP_SHARED, prot)
    except (OSError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{what}: cannot map it: {e}") from None
    if not sealed:
        assert watch is not None  # (protect refuses an unsealable file without one)
        guard(m, watch)
    return m, sealed


def is_guarded(mapping: mmap.mmap) -> bool:
    """Whether the whole of ``mapping`` is registered with the guard (for tests and fuzzing)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    start = ctypes.addressof(anchor)
    del anchor
    return any(r.start <= start and start + len(mapping) <= r.end for r in _ranges)
