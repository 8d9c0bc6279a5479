"""Scatter/gather over a list of buffers: the one set of helpers the core and the plugins share.

A request's data is a sequence of byte buffers (``memoryview`` slices of guest memory, the
readable or writable half of a :class:`~vdm.virtqueue.DescriptorChain`, or an iovec for
``preadv``/``pwritev``) that together read as one byte string. These helpers cut such a list into
pieces without copying (:func:`slice_views`, :func:`split_views`, :func:`advance`) and copy between
it and one contiguous buffer (:func:`scatter`, :func:`gather`, :func:`gather_into`, :func:`fill_zero`).

Invariants: no helper copies guest bytes unless its name says so (scatter, gather, fill); the
views returned are slices of the views given (they share memory and must be released with them);
nothing reads or writes past the end of any buffer given, whatever the offsets and lengths asked
(short results instead).
"""

from __future__ import annotations

from typing import Iterator, Sequence

__all__ = [
    "advance",
    "fill_zero",
    "gather",
    "gather_into",
    "scatter",
    "slice_views",
    "split_views",
    "total_length",
]

_ZEROS = bytes(1 << 16)


def total_length(views: Sequence[memoryview]) -> int:
    """The number of bytes in ``views``."""
    return sum(map(len, views))


def slice_views(views: Sequence[memoryview], offset: int, length: int | None) -> list[memoryview]:
    """The sub-views covering ``length`` bytes (all if None) from ``offset`` of the concatenated
    ``views``; fewer bytes if the views end first."""
    out: list[memoryview] = []
    remaining = length if length is not None else 1 << 62
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, remaining)
        if take <= 0:
            break
        out.append(v[offset : offset + take])
        remaining -= take
        offset = 0
        if remaining == 0:
            break
    return out


def advance(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (what is left after a short ``preadv``)."""
    return slice_views(views, n, None)


def split_views(views: Sequence[memoryview], lengths: Sequence[int]) -> Iterator[list[memoryview]]:
    """Cut ``views`` (in order) into consecutive groups of ``lengths`` bytes, without copying.

    The lengths must not add up to more than the views hold (IndexError)."""
    i = 0
    pos = 0  # position inside views[i]
    for want in lengths:
        group: list[memoryview] = []
        while want > 0:
            v = views[i]
            take = min(want, len(v) - pos)
            group.append(v[pos : pos + take])
            want -= take
            pos += take
            if pos == len(v):
                i += 1
                pos = 0
        yield group


def scatter(data: bytes | bytearray | memoryview, views: Sequence[memoryview]) -> int:
    """Copy ``data`` into ``views`` in order; return how many bytes fit."""
    done = 0
    total = len(data)
    for v in views:
        if done >= total:
            break
        n = min(len(v), total - done)
        v[:n] = data[done : done + n]
        done += n
    return done


def gather(views: Sequence[memoryview], offset: int = 0, length: int | None = None) -> bytes:
    """A copy of ``length`` bytes (all if None) of ``views`` from ``offset`` (short if fewer)."""
    return b"".join(bytes(v) for v in slice_views(views, offset, length))


def gather_into(dest: bytearray | memoryview, views: Sequence[memoryview], offset: int = 0) -> int:
    """Copy ``views`` in order into ``dest`` from ``offset``; return how many bytes fit."""
    pos = offset
    room = len(dest)
    for v in views:
        if pos >= room:
            break
        n = min(len(v), room - pos)
        dest[pos : pos + n] = v[:n]
        pos += n
    return pos - offset


def fill_zero(views: Sequence[memoryview]) -> None:
    """Write zeros over every byte of ``views``."""
    for v in views:
        for pos in range(0, len(v), len(_ZEROS)):
            n = min(len(_ZEROS), len(v) - pos)
            v[pos : pos + n] = _ZEROS[:n]
