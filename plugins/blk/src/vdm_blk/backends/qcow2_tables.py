"""Cached qcow2 metadata tables (L2 tables, refcount blocks) and their big-endian codecs."""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from typing import Callable

__all__ = ["Table", "TableCache", "decode_u64", "encode_u64", "find_zero"]

_BIG_ENDIAN = sys.byteorder == "big"


def decode_u64(data: bytes) -> array:
    """Big-endian 64-bit entries (L1/L2 tables, the refcount table) as an array of ints."""
    a = array("Q")
    a.frombytes(data)
    if not _BIG_ENDIAN:
        a.byteswap()
    return a


def encode_u64(a: array) -> bytes:
    if _BIG_ENDIAN:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


def find_zero(a: array, start: int) -> int:
    """Index of the first 0 in ``a`` at or after ``start``, or -1."""
    if sys.version_info >= (3, 10):
        try:
            return a.index(0, start)
        except ValueError:
            return -1
    for i in range(start, len(a)):
        if not a[i]:
            return i
    return -1


class Table:
    """A cached L2 table or refcount block: its entries and whether the disk copy is stale."""

    __slots__ = ("dirty", "entries", "gen", "writes")

    def __init__(self, entries: array, dirty: bool = False) -> None:
        self.entries = entries
        self.dirty = dirty
        self.gen = 0  # changes of the entries
        self.writes = 0  # times written out other than by a flush's snapshot


class TableCache:
    """Tables by host offset, least recently used first, at most ``cap`` of them.

    ``evict(offset, table)`` is called for a dirty table before it leaves the cache; it must
    write it (and may write others).
    """

    def __init__(self, cap: int, evict: Callable[[int, Table], None]) -> None:
        self.cap = cap
        self.evict = evict
        self.tables: OrderedDict[int, Table] = OrderedDict()

    def get(self, off: int) -> Table | None:
        t = self.tables.get(off)
        if t is not None:
            self.tables.move_to_end(off)
        return t

    def peek(self, off: int) -> Table | None:
        """The cached table at ``off`` without touching the LRU order."""
        return self.tables.get(off)

    def insert(self, off: int, t: Table) -> None:
        while len(self.tables) >= self.cap:
            old_off, old = next(iter(self.tables.items()))
            if old.dirty:
                self.evict(old_off, old)
            del self.tables[old_off]
        self.tables[off] = t

    def items(self):
        return self.tables.items()
