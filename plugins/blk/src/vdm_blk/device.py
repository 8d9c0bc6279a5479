"""virtio-blk (virtio 1.2, section 5.2): config space, request parsing, backend calls.

Reads top to bottom like kvmtool's ``virtio/blk.c``: constants, the config space, the features,
then a request's life -- parsed and checked on the queue thread, served by a worker thread (so
one slow request never holds up the others in flight), completed with its status byte.

Every request is checked before the backend sees it: the header is readable, the status byte is
writable, data lengths are multiples of 512 and sector ranges lie inside the disk. A request that
fails a check is answered IOERR (or UNSUPP for an unknown type); the device never raises out of
request handling and never reads or writes past the end of the image.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from vdm.device import VirtioDevice
from vdm.sg import slice_views, total_length
from vdm.virtqueue import DescriptorChain, Virtqueue

from .config import BlkConfig

if TYPE_CHECKING:
    from .backends import DiskBackend
    from .backends.locking import DeferredLocks
    from .fastserve import ServeStep

__all__ = ["BlkDevice"]

log = logging.getLogger(__name__)

SECTOR = 512

# feature bits
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and status
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20
WZ_FLAG_UNMAP = 1
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 16

_HEADER = struct.Struct("<IIQ")
_unpack_header = _HEADER.unpack_from
_SEGMENT = struct.Struct("<QII")
# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(exp, align, min_io, opt_io),
# writeback, unused, num_queues, discard(max sectors, max seg, alignment),
# write zeroes(max sectors, max seg, may unmap), 3 unused
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


def default_serial(path: str) -> str:
    """GET_ID's default: the image's file name, cut to the 20 bytes virtio-blk allows."""
    return os.path.basename(os.path.abspath(path)).encode()[:ID_BYTES].decode("utf-8", "ignore")


class BlkDevice(VirtioDevice):
    """A virtio-blk disk over a :class:`~vdm_blk.backends.DiskBackend`."""

    device_id = 2
    name = "virtio-blk"

    def __init__(
        self, backend: DiskBackend, config: BlkConfig, deferred_locks: DeferredLocks | None = None
    ) -> None:
        self.queue_max_sizes = (config.queue_size,) * config.queues
        super().__init__()
        self.backend = backend
        #: lock=start: the image's locks, taken when the device starts and dropped at reset
        self._deferred_locks = deferred_locks
        self.config = config
        self.read_only = config.ro or backend.read_only
        self.serial = (config.serial if config.serial is not None else default_serial(config.path)).encode()
        self.writeback = config.cache != "writethrough"
        self.capacity = backend.size // SECTOR
        self.discard_enabled = config.discard == "unmap" and backend.supports_discard and not self.read_only
        self._pool: ThreadPoolExecutor | None = None
        #: the backend's fast paths (DiskBackend declares them; the defaults answer None, "use a worker")
        self._readv_nowait = backend.readv_nowait
        self._writev_inline = backend.writev_inline
        self._inflight = 0
        self._idle = threading.Condition()
        #: the backend's compiled serve step (vdm_blk.fastserve), set when the device starts
        self._step: ServeStep | None = None
        #: counters a user (or a test) can read: requests served per type, errors
        self.stats = {
            "in": 0,
            "out": 0,
            "flush": 0,
            "get_id": 0,
            "discard": 0,
            "write_zeroes": 0,
            "errors": 0,
        }

    # ---- features and config space ---------------------------------------------------------------

    def device_features(self) -> int:
        f = 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_TOPOLOGY | 1 << F_FLUSH | 1 << F_CONFIG_WCE
        if self.read_only:
            f |= 1 << F_RO
        if len(self.queues) > 1:
            f |= 1 << F_MQ
        if self.discard_enabled:
            f |= 1 << F_DISCARD
        if self.backend.supports_write_zeroes and not self.read_only:
            f |= 1 << F_WRITE_ZEROES
        return f

    def config_space(self) -> bytes:
        b = self.backend
        logical = b.logical_block_size
        phys_exp = max(0, (max(b.physical_block_size, logical) // logical).bit_length() - 1)
        return _CONFIG.pack(
            self.capacity,
            0,  # size_max: not offered
            self.config.queue_size - 2,  # seg_max: the configured ring size (a transport may allow larger)
            0,
            0,
            0,  # geometry: not offered
            logical,
            phys_exp,
            0,  # alignment offset
            min(0xFFFF, max(1, b.physical_block_size // logical)),
            b.optimal_io_size // logical,
            int(self.writeback),
            0,
            len(self.queues),
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            max(1, b.physical_block_size // SECTOR),
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            int(self.discard_enabled),
        )

    def write_config(self, offset: int, data: bytes) -> None:
        # Only the writeback byte is writable, and only with CONFIG_WCE.
        if offset == 32 and len(data) >= 1 and self.has_feature(F_CONFIG_WCE):
            self.writeback = bool(data[0])

    # ---- life cycle ------------------------------------------------------------------------------

    def on_activate(self) -> None:
        if self._deferred_locks is not None:
            from .backends.base import DiskError

            try:
                self._deferred_locks.take()
            except DiskError as e:
                self.fail(str(e))
                return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.iothreads, thread_name_prefix="vdm-blk-io")
        make = getattr(self.backend, "serve_step", None)  # (raw and qcow2: vdm_blk.fastserve)
        self._step = make() if make is not None else None

    def on_reset(self) -> None:
        # Requests already handed to workers finish (their used-ring writes are dropped by the
        # reset queue); wait for them so that nothing touches guest memory after the reset.
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=30)
        self.writeback = self.config.cache != "writethrough"
        if self._deferred_locks is not None:
            self._deferred_locks.release()

    def resize(self, size: int | None) -> int:
        """``vdm ctl resize``: the disk becomes ``size`` bytes (None: re-read the image's size, e.g.
        after ``truncate -s``); the driver is told with a config-change notification. Returns the
        new size. ValueError says why not (read-only, not a multiple of 512, shrinking, a format
        that cannot change size). Requests past the new end fail from now on; none is cut short."""
        if size is not None:
            if self.read_only:
                raise ValueError("the disk is read-only")
            if size % SECTOR:
                raise ValueError(f"{size} is not a multiple of {SECTOR} bytes")
            if size < self.capacity * SECTOR:
                raise ValueError(
                    f"{size} bytes is smaller than the disk ({self.capacity * SECTOR}): shrinking "
                    "would cut off what the guest stored (grow only)"
                )
        from .backends.base import DiskError

        try:
            new = self.backend.resize(size)
        except DiskError as e:
            raise ValueError(str(e)) from None
        self.capacity = new // SECTOR
        self.signal_config()
        return new

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.backend.close()

    # ---- requests --------------------------------------------------------------------------------

    def process_queue(self, queue: Virtqueue) -> None:
        step = self._step
        stats = self.stats
        while True:
            if step is not None:  # (only a change reaches the C step)
                step.set_limits(self.capacity, self.writeback and not self.read_only)
            done: list[tuple[DescriptorChain, int]] = []  # completed inline, returned together
            end: tuple[bool, bool] | None = None
            try:
                while True:
                    if step is not None:
                        # the compiled step first (vdm_blk.fastserve): it takes, serves and
                        # publishes the plain reads/writes (raw; qcow2 clusters it was told of) in
                        # C and leaves the first other chain untaken for the Python path below. With
                        # nothing of this batch to push, the same C call ends the batch when it
                        # leaves nothing to pop.
                        if done:
                            got = queue.serve_compiled(step.fn, step.ctx), None
                        else:
                            got = queue.serve_compiled_end(step.fn, step.ctx)
                        if got is not None:
                            kinds, end = got
                            if kinds is not None and (kinds[0] or kinds[1]):
                                stats["in"] += kinds[0]
                                stats["out"] += kinds[1]
                            if end is not None:
                                break
                    chain = queue.pop()
                    if chain is None:
                        break
                    if not self._start_fast(queue, chain, done):
                        self._start(queue, chain)
            except BaseException:
                if done:  # what was served is returned before the reset
                    queue.push_many(done)
                raise
            # one used-index update, one interrupt decision and the re-armed kick for every request
            # completed inline in this batch: one queue call (push_many, should_notify, set_notification)
            notify, more = end if end is not None else queue.complete_batch(done)
            if notify:
                self.interrupts.queue_interrupt(queue)
            if not more:
                break

    def _start_fast(
        self, queue: Virtqueue, chain: DescriptorChain, done: list[tuple[DescriptorChain, int]]
    ) -> bool:
        """A read, or a write-back write, laid out as Linux and QEMU do it (a 16-byte header
        buffer, data buffers, a 1-byte status buffer), in the disk, served with the checks of
        :meth:`_start` and :meth:`_plan` and without their copies: the header unpacked from guest
        memory once, the data views used as they are. Inline completions go to ``done`` (pushed
        by the caller); a request that must wait goes to a worker as :meth:`_start` sends it.
        False, with nothing done: any other request, or one a check refuses (:meth:`_start` then
        serves or answers it)."""
        w = chain.writable
        r = chain.readable
        if not w or not r or len(w[-1]) != 1 or len(r[0]) != 16:
            return False
        rtype, _, sector = _unpack_header(r[0])
        if rtype == T_IN and len(r) == 1:
            data = w[:-1]
            io = self._readv_nowait
        elif rtype == T_OUT and len(w) == 1 and self.writeback and not self.read_only:
            data = r[1:]
            io = self._writev_inline
        else:
            return False
        n = total_length(data)
        cap = self.capacity
        if not n or n % SECTOR or sector > cap or n // SECTOR > cap - sector:
            return False
        offset = sector * SECTOR
        try:
            got = io(offset, data)
        except Exception:  # the worker tries again and reports the error
            got = None
        b = self.backend
        if rtype == T_IN:
            self.stats["in"] += 1
            if got == n:
                w[-1][0] = S_OK
                done.append((chain, n + 1))
                return True
            self._submit(queue, chain, w[-1], lambda: self._full(b.readv(offset, data), n), n)
            return True
        self.stats["out"] += 1
        if got == n:
            w[-1][0] = S_OK
            done.append((chain, 1))
            return True
        self._submit(queue, chain, w[-1], lambda: self._full(b.writev(offset, data), n), 0)
        return True

    def _start(self, queue: Virtqueue, chain: DescriptorChain) -> None:
        """Parse and check one request on the queue thread; hand the I/O to a worker."""
        wlen = chain.writable_len
        if wlen < 1:
            log.warning("%s: request without a writable status byte dropped", self.name)
            self.stats["errors"] += 1
            queue.count_error()
            queue.push(chain, 0)
            self.signal_used(queue)
            return
        status = slice_views(chain.writable, wlen - 1, 1)[0]
        header = chain.read(0, _HEADER.size)
        if len(header) < _HEADER.size:
            self._complete(queue, chain, status, S_IOERR, 0)
            return
        rtype, _, sector = _HEADER.unpack(header)
        try:
            work = self._plan(rtype, sector, chain, wlen)
        except _Reject as r:
            if r.status == S_IOERR:
                log.debug("%s: request type %d sector %d refused: %s", self.name, rtype, sector, r)
            self._complete(queue, chain, status, r.status, 0)
            return
        fn, data_written, data = work
        if rtype == T_IN:
            # Fast path: data already in the host's page cache is read right here, without a
            # thread handoff; only a read that would block goes to a worker.
            try:
                done = self._readv_nowait(sector * SECTOR, data)
            except Exception:  # the worker tries again and reports the error
                done = None
            if done == data_written:
                self._complete(queue, chain, status, S_OK, data_written, signal=False)
                return
        elif rtype == T_OUT and self.writeback:
            # Small buffered writes: a copy into the page cache, served here as well.
            try:
                done = self._writev_inline(sector * SECTOR, data)
            except Exception:  # the worker tries again and reports the error
                done = None
            if done == chain.readable_len - _HEADER.size:
                self._complete(queue, chain, status, S_OK, 0, signal=False)
                return
        self._submit(queue, chain, status, fn, data_written)

    def _plan(
        self, rtype: int, sector: int, chain: DescriptorChain, wlen: int
    ) -> tuple[Callable[[], None], int, list[memoryview] | None]:
        """Check a request; return the backend call that serves it, the data bytes it writes,
        and (reads and writes) the views of its data buffers."""
        b = self.backend
        if rtype == T_IN:
            data = slice_views(chain.writable, 0, wlen - 1)
            self._check_range(sector, wlen - 1)
            self.stats["in"] += 1
            return (lambda: self._full(b.readv(sector * SECTOR, data), wlen - 1)), wlen - 1, data
        if rtype == T_OUT:
            if self.read_only:
                raise _Reject(S_IOERR, "write to a read-only disk")
            n = chain.readable_len - _HEADER.size
            data = slice_views(chain.readable, _HEADER.size, n)
            self._check_range(sector, n)
            self.stats["out"] += 1
            if self.writeback:
                return (lambda: self._full(b.writev(sector * SECTOR, data), n)), 0, data

            def write_through() -> None:
                self._full(b.writev(sector * SECTOR, data), n)
                b.flush()

            return write_through, 0, data
        if rtype == T_FLUSH:
            self.stats["flush"] += 1
            return b.flush, 0, None
        if rtype == T_GET_ID:
            n = min(ID_BYTES, wlen - 1)
            ident = self.serial.ljust(ID_BYTES, b"\0")[:n]
            self.stats["get_id"] += 1

            def get_id() -> None:
                chain.write(ident, 0)  # n <= wlen - 1: the status byte is not touched

            return get_id, n, None
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            return self._plan_ranges(rtype, chain), 0, None
        raise _Reject(S_UNSUPP, f"unsupported request type {rtype}")

    def _plan_ranges(self, rtype: int, chain: DescriptorChain) -> Callable[[], None]:
        discard = rtype == T_DISCARD
        feature = F_DISCARD if discard else F_WRITE_ZEROES
        if not self.has_feature(feature):
            raise _Reject(S_UNSUPP, "discard/write zeroes not negotiated")
        if self.read_only:
            raise _Reject(S_IOERR, "discard/write zeroes on a read-only disk")
        size = chain.readable_len - _HEADER.size
        # checked before anything is copied: the guest chooses the size
        if size <= 0 or size % _SEGMENT.size or size // _SEGMENT.size > MAX_DISCARD_SEG:
            raise _Reject(S_IOERR, f"bad segment list of {size} bytes")
        payload = chain.read(_HEADER.size, size)
        segments = []
        for off in range(0, len(payload), _SEGMENT.size):
            sector, count, flags = _SEGMENT.unpack_from(payload, off)
            if count > MAX_DISCARD_SECTORS:
                raise _Reject(S_IOERR, "segment larger than advertised")
            if flags & ~WZ_FLAG_UNMAP or (discard and flags):
                raise _Reject(S_UNSUPP, f"unknown segment flags 0x{flags:x}")
            self._check_range(sector, count * SECTOR)
            segments.append((sector * SECTOR, count * SECTOR, bool(flags & WZ_FLAG_UNMAP)))
        b = self.backend
        self.stats["discard" if discard else "write_zeroes"] += 1

        def serve() -> None:
            for offset, length, unmap in segments:
                if discard:
                    b.discard(offset, length)
                else:
                    b.write_zeroes(offset, length, unmap and self.discard_enabled)

        return serve

    def _check_range(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR:
            raise _Reject(S_IOERR, f"length {nbytes} is not a multiple of 512")
        if sector > self.capacity or nbytes // SECTOR > self.capacity - sector:
            raise _Reject(S_IOERR, f"sectors {sector}+{nbytes // SECTOR} past the end ({self.capacity})")

    @staticmethod
    def _full(done: int, wanted: int) -> None:
        if done != wanted:
            raise OSError(f"short I/O: {done} of {wanted} bytes")

    def _submit(
        self,
        queue: Virtqueue,
        chain: DescriptorChain,
        status: memoryview,
        fn: Callable[[], None],
        written: int,
    ) -> None:
        with self._idle:
            self._inflight += 1

        def serve() -> None:
            try:
                fn()
                st = S_OK
            except Exception as e:  # backend errors become IOERR, never an exception out of the device
                log.warning("%s: I/O error: %s", self.name, e)
                st = S_IOERR
            try:
                self._complete(queue, chain, status, st, written if st == S_OK else 0)
            finally:
                with self._idle:
                    self._inflight -= 1
                    if self._inflight == 0:
                        self._idle.notify_all()

        pool = self._pool
        if pool is None:
            serve()
        else:
            pool.submit(serve)

    def _complete(
        self,
        queue: Virtqueue,
        chain: DescriptorChain,
        status: memoryview,
        st: int,
        written: int,
        signal: bool = True,
    ) -> None:
        if st != S_OK:
            self.stats["errors"] += 1
            queue.count_error()
        status[0] = st
        queue.push(chain, written + 1)
        if signal:
            self.signal_used(queue)


class _Reject(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
