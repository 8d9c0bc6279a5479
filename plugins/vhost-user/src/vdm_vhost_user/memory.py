"""Guest memory shared by the frontend: file descriptors mapped flat, and address translation.

The frontend (QEMU) describes guest RAM as regions: a guest-physical address, a size, the address
the frontend itself sees it at (its *user* address) and an offset into a shared file descriptor.
:class:`MemoryTable` maps each region's descriptor and builds the core's
:class:`~vdm.memory.FlatGuestMemory` over them; ring addresses arrive as user addresses and are
translated through the table. :class:`SharedGuestMemory` is what the device gets: it forwards to
the current table, so that the frontend may replace or extend the table while queues run (views
already handed out keep their mapping alive), and marks what the device wrote in the migration's
dirty log (:mod:`.dirtylog`).

A region's file may not shrink under its mapping: it is sealed against shrinking where the file
allows it, and otherwise its mapping is guarded against SIGBUS (:mod:`.faultguard`), which turns a
fault into a closed connection.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from vdm.memory import FlatGuestMemory, GuestMemory, GuestMemoryError, MemoryRegion

from .dirtylog import DirtyLog
from .faultguard import FaultWatch, map_frontend_file
from .protocol import ProtocolError

__all__ = ["MemoryTable", "RegionSpec", "SharedGuestMemory"]

_LIMIT = 1 << 64


@dataclass(frozen=True)
class RegionSpec:
    """One region as the frontend describes it."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def check(self) -> None:
        if self.size == 0:
            raise ProtocolError(f"memory region at guest 0x{self.guest_addr:x} is empty")
        for what, base in (("guest", self.guest_addr), ("user", self.user_addr), ("file", self.mmap_offset)):
            if base + self.size > _LIMIT:
                raise ProtocolError(f"memory region {what} range 0x{base:x}+0x{self.size:x} wraps around")


class _Mapped:
    __slots__ = ("map", "region", "sealed", "spec")

    def __init__(self, spec: RegionSpec, mapping: mmap.mmap, region: MemoryRegion, sealed: bool) -> None:
        self.spec = spec
        self.map = mapping
        self.region = region
        #: the file cannot shrink (sealed); otherwise the mapping is SIGBUS-guarded
        self.sealed = sealed


def map_region(spec: RegionSpec, fd: int, watch: FaultWatch | None = None) -> _Mapped:
    """mmap ``fd`` for ``spec`` after checking that the file really holds the region.

    The file is sealed against shrinking, or (if it cannot be) the mapping is guarded and faults
    are counted on ``watch``; without a watch an unsealable file is refused.
    """
    spec.check()
    what = f"memory region 0x{spec.guest_addr:x}+0x{spec.size:x}"
    m, sealed = map_frontend_file(fd, spec.mmap_offset, spec.size, watch, what, devices=True)
    view = memoryview(m)[spec.mmap_offset : spec.mmap_offset + spec.size]
    return _Mapped(spec, m, MemoryRegion(spec.guest_addr, view), sealed)


class MemoryTable:
    """The frontend's regions, mapped. Immutable: changes build a new table."""

    def __init__(self, mapped: list[_Mapped] = ()) -> None:  # type: ignore[assignment]
        self._mapped = list(mapped)
        self._mapped.sort(key=lambda m: m.spec.user_addr)
        try:
            self.memory = FlatGuestMemory([m.region for m in self._mapped])
        except ValueError as e:
            raise ProtocolError(f"memory regions overlap: {e}") from None
        for a, b in zip(self._mapped, self._mapped[1:]):
            if a.spec.user_addr + a.spec.size > b.spec.user_addr:
                raise ProtocolError("memory regions overlap in the frontend's address space")

    @classmethod
    def build(cls, specs: list[RegionSpec], fds: list[int], watch: FaultWatch | None = None) -> MemoryTable:
        """Map every region (the fds stay owned by the caller and may be closed afterwards)."""
        return cls([map_region(s, fd, watch) for s, fd in zip(specs, fds)])

    @property
    def specs(self) -> list[RegionSpec]:
        return [m.spec for m in self._mapped]

    def __len__(self) -> int:
        return len(self._mapped)

    def with_region(self, spec: RegionSpec, fd: int, watch: FaultWatch | None = None) -> MemoryTable:
        """A new table with one more region (ADD_MEM_REG)."""
        return MemoryTable([*self._mapped, map_region(spec, fd, watch)])

    def without_region(self, spec: RegionSpec) -> MemoryTable:
        """A new table without the region matching ``spec`` (REM_MEM_REG; the offset is ignored)."""
        keep = [
            m
            for m in self._mapped
            if (m.spec.guest_addr, m.spec.size, m.spec.user_addr)
            != (spec.guest_addr, spec.size, spec.user_addr)
        ]
        if len(keep) == len(self._mapped):
            raise ProtocolError(f"REM_MEM_REG: no region at guest 0x{spec.guest_addr:x}+0x{spec.size:x}")
        return MemoryTable(keep)

    def user_to_guest(self, user_addr: int, length: int) -> int:
        """Translate a frontend user address range to guest-physical; ProtocolError if unmapped."""
        for m in self._mapped:
            s = m.spec
            if s.user_addr <= user_addr and user_addr + length <= s.user_addr + s.size:
                return s.guest_addr + (user_addr - s.user_addr)
        raise ProtocolError(f"address 0x{user_addr:x}+0x{length:x} is not inside the shared memory")


class SharedGuestMemory(GuestMemory):
    """The device's view of guest RAM: the frontend's current :class:`MemoryTable`.

    It also keeps the migration's dirty log (:mod:`.dirtylog`): while *tracking* (the default;
    the handler turns it off for a connection that did not ack LOG_SHMFD, which can never get a
    log), every writable view handed out is remembered (guest address and length) until it is
    given back, and while logging is on the pages of a view given back are marked then -- after
    the device wrote them. Views handed out before logging started are marked too, since they are
    remembered from the start. Not tracking, :meth:`map` is the table's map and nothing else:
    ``unmap_needed`` is False (the virtqueue skips :meth:`unmap`), and :attr:`single_region` is the
    table's, which the compiled virtqueue path (:mod:`vdm.fastpath`) slices as that map would
    (``MAPS_SINGLE_REGION``); tracking, :attr:`single_region` is None, so every view goes through
    :meth:`map` and is remembered.
    """

    #: map() slices single_region when that is not None (vdm.fastpath relies on it)
    MAPS_SINGLE_REGION = True

    def __init__(self, table: MemoryTable | None = None) -> None:
        self._table = table if table is not None else MemoryTable()
        self._writable: dict[int, tuple[int, int]] = {}
        self._log: DirtyLog | None = None
        #: the frontend acked VHOST_F_LOG_ALL: writes are marked in the log (if it gave one)
        self.logging = False
        self._tracking = True
        self.unmap_needed = True

    def set_tracking(self, on: bool) -> None:
        """Remember writable views for the dirty log (on), or not (a connection without LOG_SHMFD:
        no log can be given; views remembered so far are forgotten)."""
        self._tracking = on
        self.unmap_needed = on
        if not on:
            self._writable.clear()

    @property
    def single_region(self) -> tuple[int, int, memoryview] | None:
        """The table's single region while not tracking (see the class doc), else None."""
        return None if self._tracking else self._table.memory.single_region

    @property
    def flat_memory(self) -> FlatGuestMemory | None:
        """The table's FlatGuestMemory while not tracking (:meth:`map` is exactly its map then,
        whatever the number of regions: vdm.fastpath's serve_batch looks buffers up in it), else None."""
        return None if self._tracking else self._table.memory

    @property
    def table(self) -> MemoryTable:
        return self._table

    def replace(self, table: MemoryTable) -> None:
        """Switch to ``table`` (one reference assignment: readers see the old or the new one)."""
        self._table = table

    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        view = self._table.memory.map(addr, length, writable)
        if writable and self._tracking:
            self._writable[id(view)] = (addr, length)
        return view

    def unmap(self, view: memoryview) -> None:
        span = self._writable.pop(id(view), None)
        if span is not None and self.logging:
            self.log_write(*span)

    def log_write(self, addr: int, length: int) -> None:
        """Mark ``[addr, addr + length)`` dirty if logging is on (the device wrote it)."""
        dirty = self._log
        if dirty is not None and self.logging:
            dirty.mark(addr, length)

    @property
    def dirty_log(self) -> DirtyLog | None:
        return self._log

    def set_dirty_log(self, dirty: DirtyLog | None) -> None:
        """Use ``dirty`` from now on (SET_LOG_BASE, or None at disconnect); the old one is closed."""
        old, self._log = self._log, dirty
        if old is not None:
            old.close()

    def contains(self, addr: int, length: int) -> bool:
        try:
            self.map(addr, length)
        except GuestMemoryError:
            return False
        return True
