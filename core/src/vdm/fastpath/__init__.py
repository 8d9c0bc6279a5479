"""The optional compiled fast path of the split virtqueue's ring work (issue 18).

``ring.c`` (cffi API mode, built by ``python3 -m vdm.fastpath.build``, which scripts/install.sh runs
when a compiler is there) does what :meth:`vdm.virtqueue.Virtqueue.pop` and
:func:`vdm.chain_walk.walk_chain` do with the rings: read the available index and the next head,
write avail_event, and walk the chain's descriptors (next, indirect, every index, length, loop and
count checked as the Python walk checks them) into a compact array of (guest address, length).
Python then maps those through the queue's :class:`~vdm.memory.GuestMemory` exactly as the Python
walk does, in chain order, so a buffer outside guest RAM fails the same way at the same point.
When guest RAM is one region and the memory's ``map`` is :class:`~vdm.memory.FlatGuestMemory`'s,
or the memory declares ``MAPS_SINGLE_REGION`` (its ``map`` slices its ``single_region`` the same
way whenever that is not None), the entries are checked against that region in C and sliced from
its view without a ``map`` call. No
device logic is compiled; the Python path stays the reference, and tests/core/test_fastpath.py
runs random and hostile rings through both (same chains, same errors).

A device may go one step further for its plain requests (issue 18): :meth:`FastRing.serve_batch`
(``vdm_serve_batch`` in ring.c, reached through :meth:`vdm.virtqueue.Virtqueue.serve_compiled`)
takes chains with the same walk and checks, hands each to a C serve function the device built
(:func:`serve_function`; vdm-blk's is vdm_blk.fastserve), and publishes the served ones with one
used-index store, counting them as pop and push would. Only chains wholly inside guest RAM as
this path sees it (the one region it slices, or a FlatGuestMemory's regions looked up in C as its
map() does; an indirect table too, when it is the chain's only ring descriptor) go to the device's
step, as (host address, length) entries; the first chain that is anything else, or that the
step declines, is left untaken for ``pop`` -- so the Python path still sees, serves or rejects
every other chain, and errors keep their one place. Asked to (``F_END``, from
:meth:`vdm.virtqueue.Virtqueue.serve_compiled_end`), the same call also ends the batch when it
leaves nothing for ``pop``: the kick request, the fence and the interrupt decision of
:mod:`vdm.used_ring`'s ``complete_batch([])``, by its rule -- so one C call per kick serves,
publishes and decides. Values go in and out through one u64 array (:attr:`FastRing.io`, ring.c's
``IO_*``); the queue's counters are an array the step adds to. tests/core/test_fastpath_serve.py
compares both entry points with the Python path on random and hostile rings.

A device may also hand over a byte string to spread over the driver's writable buffers (a received
frame, for virtio-net): :meth:`FastRing.fill` (``vdm_fill``, reached through
:meth:`vdm.virtqueue.Virtqueue.fill_compiled`) takes the next plain chains until they hold it
(each checked as pop checks it, before anything is written), copies it over them, and publishes
them with one used-index store -- all or nothing, the string never split; anything else is left
untaken for ``pop``. tests/core/test_fastpath_fill.py compares it with a pop-based device.

Selection, once at import: ``VDM_FASTPATH=0`` forces the Python path; otherwise the compiled module
is used if it imports. :data:`STATUS` says which: ``compiled`` or ``python (<reason>)``
(``vdm --version`` and ``vdm list-plugins --json`` print it).

Invariants: a :class:`FastRing` exists only while its queue's rings are mapped and is dropped with
them (it holds C pointers into the ring views and the queue's ``_held`` bytearray, never past
their life); its state array always has room for the longest walk its next call may record, and
is used by one taker at a time (pop, chain_at), as the queue's take counters already require.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chain_walk import MAX_CHAIN, VirtqueueError, failed_chain
from ..memory import FlatGuestMemory, GuestMemory, GuestMemoryError

__all__ = [
    "ACTIVE",
    "BUILT",
    "STATUS",
    "DeviceStep",
    "FastRing",
    "device_step",
    "serve_context",
    "serve_function",
]

# the codes of ring.c
DONE, INDIRECT, EMPTY = 0, 1, 2
E_AHEAD, E_HELD, E_HEAD = -11, -12, -13
# the state array's fields (ring.c's ST_*)
ST_RBYTES, ST_IND_ADDR, ST_IND_LEN, ST_STEPS, ST_N, ST_NR, ST_VALUE = 1, 2, 3, 4, 5, 6, 7
ST_HEAD, ST_LAST, ST_PENDING, ST_FLAT, ST_ENTRIES = 9, 10, 11, 12, 16
# serve_batch's in/out words (ring.c's IO_*), its flags (VDM_F_*) and what it did (VDM_R_*)
IO_LAST, IO_USED, IO_BUDGET, IO_FLAGS, IO_SIGNALLED, IO_SERVED, IO_STEPS, IO_RES, IO_KINDS = range(9)
IO_WORDS = IO_KINDS + 4
F_END, F_PUSHED, F_VALID = 1, 2, 4
R_FULL, R_ENDED, R_DECIDED, R_NOTIFY, R_MORE = 1, 2, 4, 8, 16
# the queue's counters serve_batch adds to (ring.c's VDM_C_*; latency buckets 0..64 from C_LATENCY)
C_REQUESTS, C_RBYTES, C_WBYTES, C_TOOK, C_LATENCY = range(5)
C_WORDS = C_LATENCY + 65
#: ring.c's VDM_FASTPATH_ABI: a module built from another ring.c is not used
ABI = 4


def _import() -> tuple[Any, Any, str]:
    try:
        from ._ring import ffi, lib  # type: ignore[import-not-found]
    except ImportError as e:
        if not any(Path(__file__).parent.glob("_ring*.so")):
            return None, None, "compiled module not built: python3 -m vdm.fastpath.build"
        return None, None, f"compiled module does not import: {e}"
    if getattr(lib, "VDM_FASTPATH_ABI", 1) != ABI:
        return None, None, "compiled module out of date: python3 -m vdm.fastpath.build"
    return ffi, lib, ""


_ffi, _lib, _why = _import()
#: the compiled module imports (the tests compare it with the Python path even when it is not used)
BUILT = _lib is not None
#: which path the virtqueues use: "compiled" or "python (<reason>)"
if os.environ.get("VDM_FASTPATH", "").strip() == "0":
    STATUS = "python (VDM_FASTPATH=0)"
else:
    STATUS = "compiled" if BUILT else f"python ({_why})"
#: True when the queues activated from now on use the compiled path
ACTIVE = STATUS == "compiled"


@dataclass(frozen=True)
class DeviceStep:
    """A device's compiled step module as it stands in this process (:func:`device_step`)."""

    ffi: Any
    lib: Any
    #: the module imports (the tests compare it with the Python path even when it is not used)
    built: bool
    #: "compiled", or "python (<reason>)": the core's path is off, or the module not built or broken
    status: str

    @property
    def active(self) -> bool:
        """True when devices set up from now on use the step."""
        return self.status == "compiled"

    def bind(self, function: str, state: Any) -> tuple[Any, Any]:
        """(fn, ctx) for :meth:`vdm.virtqueue.Virtqueue.serve_compiled`: this module's serve
        function ``function`` and its ``state`` (a cdata pointer of this module's ``ffi``, kept
        alive by the caller)."""
        address = int(self.ffi.cast("uintptr_t", self.ffi.addressof(self.lib, function)))
        return serve_function(address), serve_context(int(self.ffi.cast("uintptr_t", state)))


def device_step(package: str, module: str, build: str) -> DeviceStep:
    """Import a device plugin's compiled step ``package.module`` (a cffi API-mode module built by
    ``python3 -m <build>``) and say whether it is used: only when it imports and this core's
    compiled path is active, since the step runs inside the core's ``vdm_serve_batch``."""
    try:
        mod = importlib.import_module(f"{package}.{module}")
        ffi, lib, why = mod.ffi, mod.lib, ""
    except ImportError as e:
        spec = importlib.util.find_spec(package)
        where = [Path(d) for d in (spec.submodule_search_locations or [])] if spec else []
        built_file = any(any(d.glob(f"{module}*.so")) for d in where)
        ffi = lib = None
        why = f"does not import: {e}" if built_file else f"not built: python3 -m {build}"
    if not ACTIVE:
        # the core's reason without its own "python (...)": "python (core fast path off: VDM_FASTPATH=0)"
        status = f"python (core fast path off: {STATUS.removeprefix('python (').removesuffix(')')})"
    else:
        status = "compiled" if lib is not None else f"python ({why})"
    return DeviceStep(ffi, lib, lib is not None, status)


def serve_function(address: int) -> Any:
    """A device's compiled serve step (a C function of ring.c's ``vdm_serve_fn`` type, at
    ``address`` in a module the device built), as :meth:`FastRing.serve_batch` takes it."""
    return _ffi.cast("vdm_serve_fn", address)


def serve_context(address: int) -> Any:
    """The ``void *`` a serve step gets first (its own state, at ``address``; kept alive by it)."""
    return _ffi.cast("void *", address)


def _message(code: int, st: array, queue: int, limit: int, size: int) -> str:
    """The Python walk's message for ring.c's error ``code`` (vdm.chain_walk's, word for word)."""
    value = st[ST_VALUE]
    text = {
        -1: "indirect chain loops",
        -2: f"chain longer than {limit} descriptors (loop?)",
        -3: "indirect descriptor inside indirect table",
        -4: "indirect descriptor not negotiated",
        -5: "indirect descriptor with NEXT",
        -6: f"bad indirect table length {value}",
        -7: "device-readable buffer after a writable one",
        -8: f"next {value} >= table {st[ST_IND_LEN] >> 4}",
        -9: f"next index {value} >= size {size}",
        -10: "chain describes more than 4 GiB",
    }.get(code, f"fast path code {code}")
    return f"queue {queue}: {text}"


class FastRing:
    """The compiled path's view of one active queue: its rings, its held bytes, its state array."""

    __slots__ = ("_base", "_data", "_keep", "_ready", "_table", "batch", "entries", "fill_fn", "flat", "io",
                 "ioc", "limit", "memory", "pop", "region", "ring", "serve", "size", "st", "stc", "walk",
                 "walk_indirect")  # fmt: skip

    def __init__(
        self, desc: memoryview, avail: memoryview, used: memoryview, held: bytearray, size: int,
        avail_event16: int, memory: GuestMemory, *, event_idx: bool, indirect: bool,
        used_event16: int = 0, counts: array | None = None,
    ) -> None:  # fmt: skip
        ffi = _ffi
        if counts is None:
            counts = array("Q", bytes(8 * C_WORDS))
        keep = (
            ffi.from_buffer("uint8_t[]", desc),
            ffi.from_buffer("uint16_t[]", avail),
            ffi.from_buffer("uint16_t[]", used, require_writable=True),
            ffi.from_buffer("uint8_t[]", held),
            ffi.from_buffer("uint64_t[]", counts),
        )
        self._keep = keep  # the buffers the C struct points into
        self.size = size
        self.limit = size if size <= MAX_CHAIN else MAX_CHAIN
        self.ring = ffi.new(
            "struct vdm_ring *",
            {
                "desc": keep[0], "avail16": keep[1], "used16": keep[2], "held": keep[3],
                "held_len": len(held), "size": size, "limit": self.limit,
                "avail_event16": avail_event16, "event_idx": int(event_idx), "indirect": int(indirect),
                "used_event16": used_event16, "counts": keep[4],
            },
        )  # fmt: skip
        #: the queue's memory when its map() is FlatGuestMemory's, or one that says its map() slices
        #: its single_region as that does (MAPS_SINGLE_REGION): take() slices that region itself
        flat = type(memory).map is FlatGuestMemory.map or getattr(type(memory), "MAPS_SINGLE_REGION", False)
        self.flat = memory if flat else None
        #: the single_region the C walks check entries against (ring.flat_base/flat_size); None: none
        self.region: tuple[int, int, memoryview] | None = None
        #: serve_batch's fixed record (ring.c's struct vdm_batch: where guest RAM is, the room)
        self.batch = ffi.new("struct vdm_batch *", {"max": 64})
        self.entries = 0
        self._room(self.limit)
        self.pop = _lib.vdm_pop
        self.walk = _lib.vdm_walk
        self.walk_indirect = _lib.vdm_walk_indirect
        self.serve = _lib.vdm_serve_batch
        self.fill_fn = _lib.vdm_fill
        #: (the buffer, its cdata pointer) fill last copied from
        self._data: tuple[Any, Any] | None = None
        #: serve_batch's in/out words (ring.c's IO_*: the caller sets the inputs, reads the outputs)
        self.io = array("Q", bytes(8 * IO_WORDS))
        self.ioc = ffi.from_buffer("uint64_t[]", self.io)
        #: (the region, a writable cdata pointer to its bytes) serve_batch last used
        self._base: tuple[Any, Any] | None = None
        #: the single region the batch record was last set up for (None: not set up for one)
        self._ready: tuple[int, int, memoryview] | None = None
        #: (regions, their (guest address, size, host address) table, the buffers it points into)
        self._table: tuple[tuple[Any, ...], Any, list[Any]] | None = None
        self.memory = memory

    def _use_region(self, region: tuple[int, int, memoryview] | None) -> None:
        """Have the next walks check entries against ``region`` (the memory's single_region)."""
        self.region = region
        self.ring.flat_base, self.ring.flat_size = (region[0], region[1]) if region is not None else (0, 0)

    def serve_batch(self, fn: Any, ctx: Any) -> bool:
        """Take and serve chains with a device's compiled step (ring.c's vdm_serve_batch), with the
        inputs the caller set in :attr:`io` (``IO_LAST``, ``IO_USED``, ``IO_BUDGET``, ``IO_FLAGS``,
        ``IO_SIGNALLED``); its outputs are there after. False, nothing taken, when guest RAM is not
        one writable region this path may slice or a region table of one. The caller holds the
        queue's lock."""
        if not self._ram_ready():
            return False
        self.serve(self.ring, self.batch, fn, ctx, self.stc, self.ioc)
        return True

    def fill(
        self, data: Any, length: int, last: int, used_idx: int, budget: int, max_chains: int, min_len: int,
        count_at: int,
    ) -> int | None:  # fmt: skip
        """Scatter ``data[:length]`` over the available chains from ``last`` and publish them
        (ring.c's vdm_fill). Returns the chains used, n (0: nothing taken; else ``last`` and
        ``used_idx`` move by n, ``st[ST_STEPS]`` holds the descriptors read and ``st[ST_VALUE]`` the
        take-to-publish ns), or None when guest RAM is not writable regions this path may hand out.
        ``data`` is a writable buffer (its pointer is kept while it is the last one given);
        ``count_at`` < 0: no count. The caller holds the queue's lock."""
        if not self._ram_ready():
            return None
        d = self._data
        if d is None or d[0] is not data:
            self._data = d = (data, _ffi.from_buffer("uint8_t[]", data, require_writable=True))
        return self.fill_fn(self.ring, self.batch, d[1], length, last, used_idx, budget, max_chains, min_len,
                            count_at & 0xFFFFFFFFFFFFFFFF, self.stc)  # fmt: skip

    def _ram_ready(self) -> bool:
        """The batch record points at guest RAM as it is now (set up again when it changed);
        False when it cannot: guest RAM is not writable regions this path may hand out."""
        single = self.flat.single_region if self.flat is not None else None
        if single is not None and single is self.region and single is self._ready:
            return True
        return self._set_up(single)

    def _set_up(self, single: tuple[int, int, memoryview] | None) -> bool:
        """Point the batch record at guest RAM as it is now: ``single`` (the one region), else the
        region table of the FlatGuestMemory the queue's memory maps through. False: neither."""
        b = self.batch
        self._ready = None
        if single is not None:
            if single is not self.region:
                self._use_region(single)
            base = self._base
            if base is None or base[0] is not single:
                try:
                    ptr = _ffi.from_buffer("uint8_t[]", single[2], require_writable=True)
                except (TypeError, BufferError, ValueError):
                    return False  # (a read-only view: the Python path's writes fail as they must)
                self._base = base = (single, ptr)
            b.base = base[1]
            b.nregions = 0
            self._ready = single
            return True
        # guest RAM in several regions: the C step looks entries up as FlatGuestMemory.map does
        table = self._region_table()
        if table is None:
            return False
        if self.region is not None:
            self._use_region(None)  # (the walks then give guest addresses)
        b.regions = table[1]
        b.nregions = len(table[0])
        return True

    def _region_table(self) -> tuple[tuple[Any, ...], Any, list[Any]] | None:
        """The regions of the FlatGuestMemory whose map() the queue's memory is (FlatGuestMemory
        itself, or a memory's ``flat_memory`` when it says its map() is that one's), as ring.c's
        region table; None when there is none or a region is not writable."""
        memory = self.memory
        flat = memory if type(memory).map is FlatGuestMemory.map else getattr(memory, "flat_memory", None)
        if not isinstance(flat, FlatGuestMemory):
            return None
        regions = flat.regions
        table = self._table
        if (
            table is not None
            and len(table[0]) == len(regions)
            and all(a is b for a, b in zip(table[0], regions))
        ):
            return table
        if not regions:
            return None
        try:
            keep = [_ffi.from_buffer("uint8_t[]", r.view, require_writable=True) for r in regions]
        except (TypeError, BufferError, ValueError):
            return None
        cells = _ffi.new("uint64_t[]", 3 * len(regions))
        for k, (r, ptr) in enumerate(zip(regions, keep)):
            cells[3 * k], cells[3 * k + 1] = r.guest_addr, r.size
            cells[3 * k + 2] = int(_ffi.cast("uintptr_t", ptr))
        self._table = table = (regions, cells, keep)
        return table

    def _room(self, entries: int) -> None:
        """Make the state array hold ``entries`` (address, length) pairs."""
        if entries > self.entries:
            self.st = array("Q", bytes(8 * (ST_ENTRIES + 2 * entries)))
            self.stc = _ffi.from_buffer("uint64_t[]", self.st)
            self.entries = entries
            self.batch.room = entries

    def take(
        self, code: int, memory: GuestMemory, queue: int
    ) -> tuple[list[memoryview], list[memoryview], int, int]:
        """Map what ring.c walked (``code``: its answer for the chain's ring part) as walk_chain does.

        Returns (readable views, writable views, descriptors read, readable bytes), or raises
        :class:`VirtqueueError` with walk_chain's message, nothing left mapped.
        """
        st = self.st
        single = self.flat.single_region if self.flat is not None else None
        walked = self.region  # what the walk that gave ``code`` checked the entries against
        if code == DONE and st[ST_FLAT] and single is walked:
            # the common case, in short: a whole chain in the one region it was checked against
            view = walked[2]  # type: ignore[index]
            mid = ST_ENTRIES + 2 * st[ST_NR]
            readable = []
            writable = []
            for k in range(ST_ENTRIES, mid, 2):  # (loops: cheaper than comprehensions in 3.11)
                readable.append(view[st[k] : st[k + 1]])
            for k in range(mid, ST_ENTRIES + 2 * st[ST_N], 2):
                writable.append(view[st[k] : st[k + 1]])
            return readable, writable, st[ST_STEPS], st[ST_RBYTES]
        readable = []
        writable = []
        table: memoryview | None = None
        ring_steps = 0
        mmap = memory.map
        if single is not walked:
            self._use_region(single)
        try:
            while True:
                end = ST_ENTRIES + 2 * st[ST_N]
                mid = ST_ENTRIES + 2 * st[ST_NR]
                if not st[ST_FLAT]:  # entries are (guest address, length): map() decides
                    for k in range(ST_ENTRIES, mid, 2):
                        readable.append(mmap(st[k], st[k + 1]))
                    for k in range(mid, end, 2):
                        writable.append(mmap(st[k], st[k + 1], True))
                elif walked is single:  # (start, end) in the one region: map()'s own slice, inline
                    view = walked[2]  # type: ignore[index]
                    for k in range(ST_ENTRIES, mid, 2):
                        readable.append(view[st[k] : st[k + 1]])
                    for k in range(mid, end, 2):
                        writable.append(view[st[k] : st[k + 1]])
                else:  # guest RAM changed since the walk: back to guest addresses, through map()
                    base = walked[0]  # type: ignore[index]
                    for k in range(ST_ENTRIES, end, 2):
                        view = mmap(base + st[k], st[k + 1] - st[k], k >= mid)
                        (readable if k < mid else writable).append(view)
                if code != INDIRECT:
                    break
                ring_steps = st[ST_STEPS]
                length = st[ST_IND_LEN]
                table = memory.map(st[ST_IND_ADDR], length)
                self._room(length >> 4)
                walked = self.region
                st = self.st
                code = self.walk_indirect(self.ring, _ffi.from_buffer(table), length >> 4, self.stc)
            if code != DONE:
                raise VirtqueueError(_message(code, st, queue, self.limit, self.size))
        except (VirtqueueError, GuestMemoryError) as e:
            raise failed_chain(e, memory, readable + writable, queue)
        finally:
            if table is not None:
                memory.unmap(table)
        return readable, writable, st[ST_STEPS] + ring_steps, st[ST_RBYTES]
