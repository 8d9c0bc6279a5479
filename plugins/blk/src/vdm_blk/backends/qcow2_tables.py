"""Cached qcow2 metadata tables (L2 tables, refcount blocks) and their big-endian codecs."""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from typing import Callable

__all__ = ["CHUNK", "PackedCounts", "Table", "TableCache", "decode_u64", "encode_u64", "find_zero"]

_BIG_ENDIAN = sys.byteorder == "big"
#: the largest piece of a table written back at once (a table smaller than this is one piece)
CHUNK = 4096


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


def find_zero(a, start: int) -> int:
    """Index of the first 0 in ``a`` (an array or :class:`PackedCounts`) at or after ``start``, or -1."""
    if isinstance(a, PackedCounts):
        return a.find_zero(start)
    if sys.version_info >= (3, 10):
        try:
            return a.index(0, start)
        except ValueError:
            return -1
    for i in range(start, len(a)):
        if not a[i]:
            return i
    return -1


class PackedCounts:
    """Refcounts narrower than a byte (1, 2 or 4 bits), kept packed as on disk: entry 0 in the
    least significant bits of byte 0. Indexing reads and writes one entry; nothing is expanded,
    so a 2 MiB block of 16 Mi one-bit refcounts stays 2 MiB."""

    __slots__ = ("_full", "bits", "mask", "per", "raw")

    _FULL: dict[int, bytes] = {}

    def __init__(self, raw: bytearray, bits: int) -> None:
        self.raw = raw
        self.bits = bits
        self.per = 8 // bits
        self.mask = (1 << bits) - 1
        full = self._FULL.get(bits)
        if full is None:  # byte -> 1 if none of its entries is 0, else 0
            full = bytes(int(all((b >> (k * bits)) & self.mask for k in range(self.per))) for b in range(256))
            self._FULL[bits] = full
        self._full = full

    def __len__(self) -> int:
        return len(self.raw) * self.per

    def __getitem__(self, i: int) -> int:
        byte, k = divmod(i, self.per)
        return (self.raw[byte] >> (k * self.bits)) & self.mask

    def __setitem__(self, i: int, value: int) -> None:
        if not 0 <= value <= self.mask:
            raise OverflowError(f"refcount {value} does not fit in {self.bits} bits")
        byte, k = divmod(i, self.per)
        shift = k * self.bits
        self.raw[byte] = (self.raw[byte] & ~(self.mask << shift)) | (value << shift)

    def find_zero(self, start: int) -> int:
        """Index of the first 0 entry at or after ``start``, or -1 (bytes are scanned in C)."""
        per, raw = self.per, self.raw
        byte = start // per
        for i in range(start, min(len(self), (byte + 1) * per)):
            if not self[i]:
                return i
        byte += 1
        step = 1 << 16
        while byte < len(raw):
            k = raw[byte : byte + step].translate(self._full).find(0)
            if k >= 0:
                first = (byte + k) * per
                for i in range(first, first + per):
                    if not self[i]:
                        return i
            byte += step
        return -1


class Table:
    """A cached L2 table or refcount block: its entries and which pieces of the disk copy are stale.

    The table is written back in pieces (``chunk_bytes`` each, a page or a cluster if smaller):
    ``chunks`` maps each stale piece to the table's ``gen`` when it last changed, so a writer can
    tell whether a piece changed again after it took its copy. Change entries only through
    :meth:`touch`.
    """

    __slots__ = ("chunks", "entries", "gen", "shift", "writes")

    def __init__(self, entries, shift: int, dirty: bool = False) -> None:
        self.entries = entries
        self.shift = shift  # entry index >> shift = piece
        self.gen = 0  # changes of the entries
        self.writes = 0  # times written out other than by a flush's snapshot
        n = -(-len(entries) >> shift) if entries else 0
        self.chunks: dict[int, int] = dict.fromkeys(range(n), 0) if dirty else {}

    @property
    def dirty(self) -> bool:
        return bool(self.chunks)

    def touch(self, index: int) -> None:
        """Entry ``index`` was changed: its piece is stale."""
        self.gen += 1
        self.chunks[index >> self.shift] = self.gen

    def dirty_runs(self) -> list[tuple[int, int]]:
        """The stale pieces as (first piece, count) runs, in order."""
        runs: list[tuple[int, int]] = []
        for c in sorted(self.chunks):
            if runs and runs[-1][0] + runs[-1][1] == c:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((c, 1))
        return runs


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
