"""Host file I/O shared by every format: an image file or block device, optionally O_DIRECT.

* Reads and writes go with ``os.preadv``/``os.pwritev`` straight into/out of the caller's
  buffers (guest memory); no copies.
* ``direct=True`` opens a second descriptor with ``O_DIRECT``. Data I/O uses it when the
  buffers' addresses and lengths and the file offset are aligned to the device's logical block
  size. Otherwise the data goes through an aligned bounce buffer (one copy) on the direct
  descriptor; a request that is not even aligned in the file (qcow2 metadata, compressed
  clusters) uses the buffered descriptor. If the kernel still refuses a direct transfer
  (EINVAL: the file system wants a larger alignment), the request is retried with page
  alignment, and later requests keep it.
* Memory the kernel cannot pin for DMA: O_DIRECT hands the caller's pages to the device through
  get_user_pages(), which refuses some mappings the CPU reads and writes fine (Xen's privcmd
  foreign mappings of a domU's RAM, memfd_secret memory, PFN-mapped device memory): the call
  fails with EFAULT. The request is then made again through the bounce buffer, and every later
  direct request of this file is bounced from the start (one log line says so). The retry is
  safe: a read fills the same buffers again, a write stores the same bytes again. Detecting it
  here rather than asking guest memory whether it can be a DMA target keeps the core and the
  hypervisor plugins out of it (no flag to carry through every memory type, none to forget in
  a new one) and covers any mapping GUP refuses, whoever made it; the cost is one failed
  system call per file.
* ``writethrough=True`` opens with ``O_DSYNC``: each write is durable when it returns.
* :meth:`HostFile.read_nowait` and :meth:`HostFile.write_inline` serve what needs no waiting on
  the caller's thread (page-cache hits, small buffered writes), so a device can skip the
  handoff to a worker; they return None for "use a worker". A file system that refuses
  ``RWF_NOWAIT`` (EOPNOTSUPP/EINVAL: tmpfs before Linux 6.6, 9p, FUSE...) is asked once per open
  file, not on every request; after that, reads of a file on a memory file system (tmpfs, ramfs:
  the data is in memory, there is no device to wait for) are plain inline reads, as writes of up
  to INLINE_WRITE_MAX are after the same refusal, and reads elsewhere go to a worker untried.
  Writes to a file on tmpfs/ramfs go inline at any size (``write_inline_max``): a copy into
  memory, never throttled as dirty pages of a disk file system are.
* The image is locked the way QEMU locks images (:mod:`.locking`).
* It is the ``file`` :class:`~.protocol.Protocol` (the one every format uses for a local path):
  discard punches a hole (block devices: BLKDISCARD), write-zeroes uses FALLOC_FL_ZERO_RANGE
  (BLKZEROOUT), falling back to written zeros where the file system has neither.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
from typing import Any, Sequence

from vdm.sg import advance, fill_zero, gather_into, scatter, split_views, total_length

from .base import SECTOR, DiskError
from .linux import (
    BLKDISCARD,
    BLKZEROOUT,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    blk_range_ioctl,
    block_device_info,
    fallocate,
)
from .locking import lock_image
from .protocol import Protocol

__all__ = ["HostFile"]

log = logging.getLogger(__name__)

IOV_MAX = 1024
BOUNCE_CHUNK = 1 << 20
PAGE = mmap.PAGESIZE
#: buffered writes up to this size may be made on the caller's thread (see write_inline)
INLINE_WRITE_MAX = 64 << 10
#: HostFile.write_inline_max of a buffered file on tmpfs/ramfs: writes of any size go inline there
INLINE_WRITE_ANY = 1 << 62


#: statfs f_type of the memory file systems (tmpfs, ramfs): reading them never waits for a device
_MEMORY_FS_MAGIC = (0x01021994, 0x858458F6)


def _on_memory_fs(fd: int) -> bool:
    """Whether ``fd`` is a file on tmpfs or ramfs (``fstatfs``; False when it cannot say)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux); f_type first
    try:
        if ctypes.CDLL(None, use_errno=True).fstatfs(fd, buf) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF in _MEMORY_FS_MAGIC


def _address(view: memoryview) -> int | None:
    """The address of a writable buffer; None when it cannot be had cheaply (read-only views)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


ZERO_CHUNK = 1 << 20


class HostFile(Protocol):
    """An open image file or block device, with optional O_DIRECT and O_DSYNC."""

    def __init__(
        self, path: str, *, read_only: bool, direct: bool = False, writethrough: bool = False
    ) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.writethrough = writethrough and not read_only
        self._write_nowait = getattr(os, "RWF_NOWAIT", 0)
        #: preadv's flag for read_nowait: RWF_NOWAIT, or 0 once this file's file system refused it
        self._read_nowait = self._write_nowait
        #: set with _read_nowait = 0: the file is on a memory file system, read_nowait reads plainly
        self._read_plain = False
        if self.writethrough:
            flags |= os.O_DSYNC
        try:
            # O_NONBLOCK: a FIFO (or a device that waits on open) must not block the open; the
            # type check below refuses it, and regular files and block devices ignore the flag
            self.fd = os.open(path, flags | os.O_NONBLOCK)
        except FileNotFoundError:
            raise DiskError(f"{path}: no such file; check the path")
        except IsADirectoryError:
            raise DiskError(f"{path}: not a regular file or a block device")
        except PermissionError:
            hint = "" if read_only else " (or open it read-only with ro)"
            raise DiskError(f"{path}: permission denied; check its permissions{hint}")
        except OSError as e:
            if e.errno == errno.EROFS:
                raise DiskError(f"{path}: on a read-only file system or device; open it with ro")
            raise DiskError(f"{path}: cannot open: {e.strerror}")
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise DiskError(f"{path}: not a regular file or a block device")
        os.set_blocking(self.fd, True)
        self.logical_block_size = SECTOR
        self.physical_block_size = 4096
        self.optimal_io_size = 0
        if self.is_block:
            try:
                (self._blk_size, self.logical_block_size, self.physical_block_size, self.optimal_io_size) = (
                    block_device_info(self.fd)
                )
            except OSError as e:
                os.close(self.fd)
                raise DiskError(f"{path}: cannot query the block device: {e.strerror}")
        try:
            lock_image(self.fd, path, writable=not read_only)
        except BaseException:
            os.close(self.fd)
            raise
        #: the largest buffered write write_inline makes (a compiled step gets it too): any size on
        #: tmpfs/ramfs, where a write is a copy into memory that never waits for a device or for
        #: dirty-page throttling (those pages are not written back), as a read there is; elsewhere
        #: INLINE_WRITE_MAX, since a plain write may block while the kernel throttles dirty pages
        self.write_inline_max = (
            INLINE_WRITE_ANY if not self.is_block and _on_memory_fs(self.fd) else INLINE_WRITE_MAX
        )
        self.align = max(SECTOR, self.logical_block_size)
        self.supports_discard = self.supports_write_zeroes = not read_only
        self.can_grow = not self.is_block
        self.dfd: int | None = None
        #: True once a direct transfer failed with EFAULT (memory GUP refuses): bounce from then on
        self.bounce_always = False
        self._bounce_lock = threading.Lock()
        if direct:
            try:
                self.dfd = os.open(path, flags | os.O_DIRECT | os.O_NONBLOCK)
                if not os.path.samestat(os.fstat(self.dfd), st):
                    os.close(self.dfd)
                    os.close(self.fd)
                    raise DiskError(f"{path}: the file changed while it was being opened; try again")
                os.set_blocking(self.dfd, True)
            except OSError as e:
                os.close(self.fd)
                raise DiskError(
                    f"{path}: O_DIRECT is not supported here ({e.strerror}); "
                    "open it without direct/cache=none"
                )

    # ---- size ------------------------------------------------------------------------------------

    def size(self) -> int:
        if self.is_block:
            return self._blk_size
        return os.fstat(self.fd).st_size

    # ---- data I/O --------------------------------------------------------------------------------

    def step_options(self, read_only: bool) -> dict[str, Any]:
        """How inline I/O is made now, as a compiled step (vdm_blk.fastserve) takes it for a disk
        on this file (``read_only``: the disk's own setting): preadv2 flags of read_nowait and
        whether it reads inline at all, whether write-back writes may be made and pwritev2 flags
        of write_inline -- RWF_NOWAIT, or 0 once the file system refused it (reads then inline only
        on tmpfs/ramfs) -- and the largest such write (:attr:`write_inline_max`)."""
        return {
            "reads": bool(self._read_nowait or self._read_plain),
            "read_flags": self._read_nowait,
            "writes": not (self.writethrough or self.read_only or read_only),
            "write_flags": self._write_nowait,
            "write_max": self.write_inline_max,
        }

    def _use_direct(self, views: Sequence[memoryview], offset: int) -> bool | None:
        """True: aligned; None: alignment unknown (try it); False: use the bounce buffer."""
        a = self.align
        if offset % a:
            return False
        unknown = False
        for v in views:
            if len(v) % a:
                return False
            addr = _address(v)
            if addr is None:
                unknown = True
            elif addr % a:
                return False
        return None if unknown else True

    def read_nowait(self, views: Sequence[memoryview], offset: int, length: int | None = None) -> int | None:
        """Read only if every byte is in the page cache (RWF_NOWAIT); None when it would block
        (or this file cannot say: O_DIRECT, too many segments, a kernel without RWF_NOWAIT).
        ``length`` is the views' total length, when the caller knows it already.

        Where the file system refuses RWF_NOWAIT it is asked once for this file; from then on
        reads are plain ``preadv`` calls if the file is on tmpfs or ramfs, else None at once."""
        if self.dfd is not None or len(views) > IOV_MAX:
            return None
        if self._read_nowait:
            try:
                n = os.preadv(self.fd, views, offset, self._read_nowait)
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # this file system does not take it: never ask again for this file
                self._read_plain = not self.is_block and _on_memory_fs(self.fd)
                self._read_nowait = 0
            else:
                return n if n == (total_length(views) if length is None else length) else None
        if not self._read_plain:
            return None
        n = os.preadv(self.fd, views, offset)  # tmpfs/ramfs: a copy from memory, as a hit would be
        return n if n == (total_length(views) if length is None else length) else None

    def write_inline(self, views: Sequence[memoryview], offset: int) -> int | None:
        """Write a small request into the page cache on the caller's thread; None to say "use a
        worker" (O_DIRECT, O_DSYNC, more than :attr:`write_inline_max` bytes -- INLINE_WRITE_MAX,
        any size on tmpfs/ramfs --, too many segments, or the kernel's RWF_NOWAIT said it would block).

        A buffered write of a few KiB is a copy into the page cache, cheaper than the handoff to
        a worker thread. Where the file system takes RWF_NOWAIT for buffered writes the write
        never blocks; where it refuses (ext4 does), the plain write may block while the kernel
        throttles dirty pages, stalling the caller the way a synchronous backend (e.g.
        cloud-hypervisor's raw file without io_uring) does.
        """
        if (
            self.dfd is not None
            or self.writethrough
            or self.read_only
            or len(views) > IOV_MAX
            or total_length(views) > self.write_inline_max
        ):
            return None
        if self._write_nowait:
            try:
                return os.pwritev(self.fd, views, offset, self._write_nowait)
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._write_nowait = 0  # this file system does not take it: plain writes from now
        return os.pwritev(self.fd, views, offset)

    def preadv(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` from ``offset``; bytes past the end of the file read as zeros."""
        if self.dfd is None and len(views) <= IOV_MAX:
            n = os.preadv(self.fd, views, offset)
            if n == sum(len(v) for v in views):
                return n
            return n + self._loop(os.preadv, self.fd, advance(views, n), offset + n, True)
        return self._transfer(views, offset, True)

    def pwritev(self, views: Sequence[memoryview], offset: int) -> int:
        """Write ``views`` at ``offset``."""
        if self.dfd is None and len(views) <= IOV_MAX:
            n = os.pwritev(self.fd, views, offset)
            if n == sum(len(v) for v in views):
                return n
            return n + self._loop(os.pwritev, self.fd, advance(views, n), offset + n, False)
        return self._transfer(views, offset, False)

    def _transfer(self, views: Sequence[memoryview], offset: int, reading: bool) -> int:
        """Through the O_DIRECT descriptor (straight or bounced), or the buffered one if the
        range is not aligned in the file."""
        call = os.preadv if reading else os.pwritev
        want = total_length(views)
        while True:
            a = self.align
            if self.dfd is None or offset % a or want % a:
                return self._loop(call, self.fd, list(views), offset, reading)
            try:
                if not self.bounce_always and self._use_direct(views, offset) is not False:
                    try:
                        return self._loop(call, self.dfd, list(views), offset, reading)
                    except OSError as e:
                        if e.errno == errno.EFAULT:
                            self._cannot_pin()
                        elif e.errno != errno.EINVAL:
                            raise
                        # misaligned memory that the address check could not see, or memory
                        # the kernel cannot pin: bounce it
                return self._bounce(views, offset, reading)
            except OSError as e:
                if e.errno != errno.EINVAL or a >= PAGE:
                    raise
                self.align = PAGE  # the file system wants more than the logical block size: retry

    def _cannot_pin(self) -> None:
        """A direct transfer met memory the kernel cannot pin: bounce every later one (said once)."""
        with self._bounce_lock:
            if self.bounce_always:
                return
            self.bounce_always = True
        log.warning(
            "%s: the kernel cannot do direct I/O on this guest memory (EFAULT); "
            "its direct I/O goes through a bounce buffer from now on",
            self.path,
        )

    @staticmethod
    def _loop(call, fd: int, views: list[memoryview], offset: int, reading: bool) -> int:
        done = 0
        while views:
            n = call(fd, views[:IOV_MAX], offset + done)
            if n == 0:
                if not reading:
                    raise OSError(errno.EIO, "write made no progress")
                fill_zero(views)  # past the end of the file: zeros
                done += total_length(views)
                break
            done += n
            views = advance(views, n)
        return done

    def _bounce(self, views: Sequence[memoryview], offset: int, reading: bool) -> int:
        """The request through an aligned host buffer of up to BOUNCE_CHUNK bytes on the direct
        descriptor, a chunk at a time (a copy out of/into ``views`` per chunk)."""
        total = total_length(views)
        with mmap.mmap(-1, min(total, BOUNCE_CHUNK)) as buf:
            bview = memoryview(buf)
            try:
                chunks = [min(len(bview), total - p) for p in range(0, total, len(bview))]
                pos = offset
                for n, group in zip(chunks, split_views(views, chunks)):
                    if reading:
                        self._loop(os.preadv, self.dfd, [bview[:n]], pos, True)  # type: ignore[arg-type]
                        scatter(bview[:n], group)
                    else:
                        gather_into(bview, group)
                        self._loop(os.pwritev, self.dfd, [bview[:n]], pos, False)  # type: ignore[arg-type]
                    pos += n
                return total
            finally:
                bview.release()

    # ---- metadata I/O (buffered descriptor, any alignment) ---------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        out = bytearray(length)
        got = 0
        while got < length:
            n = os.preadv(self.fd, [memoryview(out)[got:]], offset + got)
            if n == 0:
                break
            got += n
        return bytes(out[:got])

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._loop(os.pwritev, self.fd, [memoryview(data)], offset, False)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (files: reads zeros afterwards) or BLKDISCARD (block devices: what a
        discarded range reads is up to the device). Devices without discard ignore it."""
        if not length:
            return
        if self.is_block:
            try:
                blk_range_ioctl(self.fd, BLKDISCARD, offset, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
            return
        self._zero_file(offset, length, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """BLKZEROOUT, or for files a hole (unmap) or FALLOC_FL_ZERO_RANGE; else written zeros."""
        if not length:
            return
        if self.is_block:
            try:
                blk_range_ioctl(self.fd, BLKZEROOUT, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
            self._write_zero_bytes(offset, length)
            return
        mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
        self._zero_file(offset, length, mode | FALLOC_FL_KEEP_SIZE)

    def _zero_file(self, offset: int, length: int, mode: int) -> None:
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._write_zero_bytes(offset, length)
            return
        if self.writethrough:
            self.sync()

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        with mmap.mmap(-1, min(length, ZERO_CHUNK)) as zeros:
            zview = memoryview(zeros)
            try:
                done = 0
                while done < length:
                    n = min(len(zview), length - done)
                    self.pwritev([zview[:n]], offset + done)
                    done += n
            finally:
                zview.release()

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def close(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = -1
        self.dfd = None
