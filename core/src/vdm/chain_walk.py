"""Walking one descriptor chain of a split virtqueue (virtio 1.2, 2.7.5 and 2.7.5.3), with every
rule checked on what the guest wrote.

:func:`walk_chain` follows a chain from its head through the descriptor table and the indirect
table one descriptor may point to, maps each buffer through the queue's
:class:`~vdm.memory.GuestMemory` and returns the device-readable and device-writable views in
chain order. It is the part of :meth:`vdm.virtqueue.Virtqueue.pop` that reads descriptors; the
queue keeps the head bookkeeping and the counters.

Rules (a violation raises :class:`VirtqueueError`, with nothing left mapped): every ``next`` below
the table's size; at most ``MAX_CHAIN`` ring descriptors (and the queue size: more is a loop or too
long) and ``MAX_INDIRECT`` entries in the indirect table, so one chain costs at most 8,192 reads
whatever the queue size; an indirect descriptor only when negotiated, never with NEXT, never inside
an indirect table, its length a non-zero multiple of 16; at most ``MAX_CHAIN_BYTES`` in all;
device-writable buffers only after device-readable ones; every buffer inside guest RAM.

:class:`VirtqueueError` lives here because the walk raises most of them; :mod:`vdm.virtqueue`
re-exports it and the limits, their public home.
"""

from __future__ import annotations

from .memory import GuestMemory, GuestMemoryError
from .ring_layout import DESC, DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["MAX_CHAIN", "MAX_CHAIN_BYTES", "MAX_INDIRECT", "VirtqueueError", "walk_chain"]

#: Upper bound on the entries of one indirect table (Linux uses at most the queue size).
MAX_INDIRECT = 4096
#: Upper bound on the descriptors of one chain in the descriptor table, whatever the queue size
#: (QEMU's is 1024): a chain's walk is at most MAX_CHAIN + MAX_INDIRECT reads, one kick's slice.
MAX_CHAIN = 4096
#: Upper bound on the bytes one chain may describe (virtio lengths are 32-bit).
MAX_CHAIN_BYTES = 1 << 32

_unpack_desc = DESC.unpack_from
assert DESC_SIZE == 16


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules (a guest error: the device must be reset)."""


def failed_chain(
    error: VirtqueueError | GuestMemoryError, memory: GuestMemory, views: list[memoryview], queue: int
) -> VirtqueueError:
    """Unmap ``views`` (a chain mapped so far) and return the :class:`VirtqueueError` to raise.

    ``error`` is what stopped the chain's walk: a :class:`VirtqueueError` is returned as it is, a
    :class:`GuestMemoryError` (a buffer outside guest RAM) becomes one naming ``queue``, with
    ``error`` as its cause. The one error path of :func:`walk_chain` and of
    :meth:`vdm.fastpath.FastRing.take`, so both leave nothing mapped and say the same.
    """
    for v in views:
        memory.unmap(v)
    if isinstance(error, GuestMemoryError):
        wrapped = VirtqueueError(f"queue {queue}: {error}")
        wrapped.__cause__ = error
        return wrapped
    return error


def walk_chain(
    table: memoryview, size: int, head: int, memory: GuestMemory, indirect: bool, queue: int
) -> tuple[list[memoryview], list[memoryview], int, int]:
    """Walk the chain at ``head`` (below ``size``, the caller checked) of the descriptor ``table``.

    Returns (readable views, writable views, descriptors read, readable bytes). ``indirect``:
    VIRTQ_F_INDIRECT_DESC was negotiated; ``queue``: the queue's index, for the messages. Ring
    descriptors and the indirect table are walked in one loop: an indirect descriptor swaps the
    table walked and ends the ring part.
    """
    table_len = size
    indirect_table: memoryview | None = None
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    i = head
    steps = 0
    ring_steps = 0  # the ring descriptors walked before the indirect table
    limit = size if size <= MAX_CHAIN else MAX_CHAIN
    total = rbytes = 0
    mmap = memory.map
    try:
        while True:
            addr, length, flags, nxt = _unpack_desc(table, i << 4)  # (DESC_SIZE: 16 bytes)
            steps += 1
            if steps > limit:
                if indirect_table is not None:
                    raise VirtqueueError(f"queue {queue}: indirect chain loops")
                raise VirtqueueError(f"queue {queue}: chain longer than {limit} descriptors (loop?)")
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect_table is not None:
                    raise VirtqueueError(f"queue {queue}: indirect descriptor inside indirect table")
                if not indirect:
                    raise VirtqueueError(f"queue {queue}: indirect descriptor not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {queue}: indirect descriptor with NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"queue {queue}: bad indirect table length {length}")
                # from here on the table is walked instead; its last entry ends the chain
                table = indirect_table = memory.map(addr, length)
                table_len = limit = length // DESC_SIZE
                ring_steps, steps, i = steps, 0, 0
                continue
            total += length  # (checked against MAX_CHAIN_BYTES once, after the walk)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(mmap(addr, length, True))
            else:
                if writable:
                    raise VirtqueueError(f"queue {queue}: device-readable buffer after a writable one")
                readable.append(mmap(addr, length))
                rbytes += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                if indirect_table is not None:
                    raise VirtqueueError(f"queue {queue}: next {nxt} >= table {table_len}")
                raise VirtqueueError(f"queue {queue}: next index {nxt} >= size {table_len}")
            i = nxt
        if total > MAX_CHAIN_BYTES:
            raise VirtqueueError(f"queue {queue}: chain describes more than 4 GiB")
    except (VirtqueueError, GuestMemoryError) as e:
        raise failed_chain(e, memory, readable + writable, queue)
    finally:
        if indirect_table is not None:
            memory.unmap(indirect_table)
    return readable, writable, steps + ring_steps, rbytes
