"""The compiled fast path (vdm.fastpath) against the Python path, the reference.

The differential tests lay out random and hostile rings (loops, indexes past the table, indirect
tables nested, too long or not negotiated, buffers outside guest RAM, readable after writable,
heads offered twice, available indexes running ahead) in real guest memory, pop them through a
queue on each path and compare everything a user could see: each chain's head and buffers (the
guest ranges mapped, in order), each error's message, the counters, and the guest RAM afterwards
(avail_event). The selection tests run ``vdm`` the way a user would.
"""

from __future__ import annotations

import importlib.machinery
import json
import mmap
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import vdm.fastpath as fastpath
from vdm.chain_walk import MAX_CHAIN
from vdm.memory import FlatGuestMemory, GuestMemory, MemoryRegion
from vdm.virtqueue import Virtqueue, VirtqueueError

needs_build = pytest.mark.skipif(
    not fastpath.BUILT, reason=f"the compiled fast path is not built here: {fastpath.STATUS}"
)

BASE = 0x10000
RAM = 64 << 10
DESC_AT, AVAIL_AT, USED_AT = BASE, BASE + 0x4000, BASE + 0x6000  # room for 1024 entries
SCRATCH = BASE + 0x8000  # buffers and indirect tables
_DESC = struct.Struct("<QIHH")


class RecordingMemory(FlatGuestMemory):
    """Guest RAM that records every range mapped (the order and ranges the walk asked for)."""

    def __init__(self, ram: bytearray | mmap.mmap) -> None:
        super().__init__([MemoryRegion(BASE, ram)])
        self.calls: list[tuple[int, int, bool]] = []

    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        self.calls.append((addr, length, writable))
        return super().map(addr, length, writable)


class DeclaredFlatMemory(GuestMemory):
    """A wrapper whose map() is its inner FlatGuestMemory's and says so (MAPS_SINGLE_REGION), as
    vdm-vhost-user's shared memory does when it does not track views: the compiled path slices
    its single_region itself."""

    MAPS_SINGLE_REGION = True

    def __init__(self, ram: bytearray | mmap.mmap) -> None:
        self.inner = FlatGuestMemory([MemoryRegion(BASE, ram)])

    @property
    def single_region(self) -> tuple[int, int, memoryview] | None:
        return self.inner.single_region

    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        return self.inner.map(addr, length, writable)


def _addr(rng: random.Random) -> int:
    kind = rng.randrange(8)
    if kind <= 4:
        return SCRATCH + rng.randrange(0x7000)
    if kind == 5:
        return BASE + RAM - rng.randrange(64)  # straddles the end of RAM
    if kind == 6:
        return rng.randrange(BASE)  # below RAM
    return rng.randrange(1 << 64)


def _desc(rng: random.Random, size: int, indirect_table: bool = False) -> bytes:
    flags = rng.choice([0, 1, 2, 3, 1, 3, 4, 5, 6, 7, rng.randrange(1 << 16)])
    if flags & 4 and rng.random() < 0.7:
        length = 16 * rng.choice([1, 2, 3, 8, 4096, 4097])
        addr = SCRATCH + 16 * rng.randrange(0x600)
    else:
        length = rng.choice([0, 1, 16, 100, 512, 4096, rng.randrange(1 << 32), 0xFFFFFFFF])
        addr = _addr(rng)
    limit = 10 if indirect_table else size + 2
    nxt = rng.randrange(limit) if rng.random() < 0.95 else rng.randrange(1 << 16)
    return _DESC.pack(addr, length, flags, nxt)


def _address(view: memoryview, start: int = 0) -> int | None:
    """Where a view of guest RAM starts in the host's memory, less ``start`` (None if it is empty)."""
    if not len(view):
        return None
    ffi = fastpath._ffi
    return int(ffi.cast("uintptr_t", ffi.from_buffer(view))) - start


def _layout(seed: int) -> tuple[bytearray, int, bool, bool, list[int]]:
    """Random rings in a fresh RAM image: (ram, size, event_idx, indirect, push decisions)."""
    rng = random.Random(seed)
    ram = bytearray(rng.randbytes(RAM))
    size = 1 << rng.randrange(0, 11)
    desc = b"".join(_desc(rng, size) for _ in range(size))
    if rng.random() < 0.5:  # a well-formed chain or two among the noise
        for i in range(min(size, rng.randrange(1, 6))):
            flags = (1 if i + 1 < min(size, 5) else 0) | (2 if i >= 2 else 0)
            desc = desc[: 16 * i] + _DESC.pack(SCRATCH + 64 * i, 64, flags, i + 1) + desc[16 * i + 16 :]
    ram[DESC_AT - BASE : DESC_AT - BASE + len(desc)] = desc
    for _ in range(rng.randrange(4)):  # indirect tables in scratch
        at = SCRATCH - BASE + 16 * rng.randrange(0x600)
        table = b"".join(_desc(rng, size, True) for _ in range(rng.randrange(1, 10)))
        ram[at : at + len(table)] = table[: RAM - at]
    last = rng.randrange(1 << 16)
    heads = [rng.randrange(size + 2) if rng.random() < 0.95 else rng.randrange(1 << 16) for _ in range(size)]
    avail = struct.pack("<HH", rng.randrange(2), (last + rng.randrange(size + 3)) & 0xFFFF)
    avail += b"".join(struct.pack("<H", h) for h in heads)
    ram[AVAIL_AT - BASE : AVAIL_AT - BASE + len(avail)] = avail
    pushes = [rng.randrange(3) for _ in range(size + 4)]
    return ram, size, rng.random() < 0.5, rng.random() < 0.7, [last, *pushes]


def _run(compiled: bool, ram: bytearray | mmap.mmap, size: int, event_idx: bool, indirect: bool,
         plan: list[int], monkeypatch: pytest.MonkeyPatch,
         rings: tuple[int, int, int] = (DESC_AT, AVAIL_AT, USED_AT)) -> dict:  # fmt: skip
    """Pop (and push some of) what the rings offer on one path; everything a user could compare.

    An odd first plan entry takes plain FlatGuestMemory (which the compiled path slices itself, with
    no map() call to record), or one in four DeclaredFlatMemory (the same, through a wrapper that
    says so); an even one RecordingMemory (every range mapped is compared).
    """
    monkeypatch.setattr(fastpath, "ACTIVE", compiled)
    memory: GuestMemory
    if plan[0] % 2 == 0:
        memory = RecordingMemory(ram)
    elif plan[0] % 4 == 3:
        memory = DeclaredFlatMemory(ram)
    else:
        memory = FlatGuestMemory([MemoryRegion(BASE, ram)])
    calls = memory.calls if isinstance(memory, RecordingMemory) else []
    start = _address(memoryview(ram)) or 0
    q = Virtqueue(0, max(size, 1024))
    q.set_size(size)
    q.set_addresses(*rings)
    q.restore(plan[0], plan[0])
    q.set_ready(True)
    q.activate(memory, event_idx=event_idx, indirect=indirect)
    assert (q._fast is not None) == compiled  # the path asked for is the one taken
    if q._fast is not None:  # and it slices guest RAM itself exactly for the memories that allow it
        assert (q._fast.flat is memory) == (not isinstance(memory, RecordingMemory))
    seen: list[object] = []
    for decision in plan[1:]:
        before = len(calls)
        try:
            chain = q.pop()
        except VirtqueueError as e:
            seen.append(("error", str(e), calls[before:]))
            continue
        if chain is None:
            seen.append(None)
            break
        views = [(_address(v, start), len(v)) for v in chain.readable + chain.writable]
        seen.append((chain.head, len(chain.readable), views, calls[before:]))
        if decision == 0:
            q.push(chain, 0)
        elif decision == 1:
            q.discard(chain)
    counters = (q.errors, q.descriptors_walked, q.requests, q.bytes_read, q.last_avail_idx, q.in_flight)
    return {"seen": seen, "counters": counters, "ram": bytes(ram[: AVAIL_AT - BASE + 0x4000])}


@needs_build
@pytest.mark.parametrize("block", range(8))
def test_random_and_hostile_rings_give_the_same_chains_and_errors(block, monkeypatch):
    errors = chains = 0
    for seed in range(block * 250, block * 250 + 250):
        python = _run(False, *_args(seed), monkeypatch)
        compiled = _run(True, *_args(seed), monkeypatch)
        assert compiled == python, f"seed {seed}"
        errors += sum(1 for s in python["seen"] if isinstance(s, tuple) and s[0] == "error")
        chains += sum(1 for s in python["seen"] if isinstance(s, tuple) and s[0] != "error")
    assert errors > 50 and chains > 50  # both kinds of outcome were compared, not just one


def _args(seed: int) -> tuple:
    ram, size, event_idx, indirect, plan = _layout(seed)
    return ram, size, event_idx, indirect, plan


@needs_build
def test_a_loop_in_a_big_queue_stops_at_max_chain_on_both_paths(monkeypatch):
    size = 8192  # more than MAX_CHAIN: the limit is MAX_CHAIN, not the size
    rings = (BASE, BASE + 0x20000, BASE + 0x28000)
    results = []
    for compiled in (False, True):
        ram = bytearray(512 << 10)
        for i in range(size):  # one long loop
            _DESC.pack_into(ram, 16 * i, SCRATCH, 1, 1, (i + 1) % size)
        struct.pack_into("<HHH", ram, 0x20000, 0, 1, 0)
        results.append(_run(compiled, ram, size, True, True, [0, 2], monkeypatch, rings=rings))
    assert results[1] == results[0]
    assert results[0]["seen"][0][1] == f"queue 0: chain longer than {MAX_CHAIN} descriptors (loop?)"


@needs_build
def test_the_four_gib_limit_is_checked_after_the_walk_on_both_paths(monkeypatch):
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)  # (Linux)
        big = mmap.mmap(-1, (4 << 30) + (1 << 20), flags=flags)
    except (OSError, OverflowError) as e:
        pytest.skip(f"cannot reserve 4 GiB of address space here: {e}")
    results = []
    try:
        for compiled in (False, True):
            _DESC.pack_into(big, DESC_AT - BASE, BASE, 0xFFFFFFFF, 1, 1)
            _DESC.pack_into(big, DESC_AT - BASE + 16, BASE, 2, 2, 0)
            struct.pack_into("<HHH", big, AVAIL_AT - BASE, 0, 1, 0)
            results.append(_run(compiled, big, 8, True, True, [0, 2], monkeypatch))
            results[-1].pop("ram")
    finally:
        big.close()
    assert results[1] == results[0]
    assert results[0]["seen"][0][1] == "queue 0: chain describes more than 4 GiB"


def _vdm(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vdm.cli.main", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_vdm_says_which_path_is_active():
    forced = _vdm("--version", VDM_FASTPATH="0")
    assert forced.stdout.strip().endswith("(fastpath: python (VDM_FASTPATH=0))"), forced.stdout
    default = _vdm("list-plugins", "--json", VDM_FASTPATH="1")
    expected = "compiled" if fastpath.BUILT else f"python ({fastpath._why})"
    assert json.loads(default.stdout)["fastpath"] == expected
    assert f"(fastpath: {expected})" in _vdm("--version", VDM_FASTPATH="1").stdout


def test_build_without_a_compiler_is_one_line_and_no_failure(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "vdm.fastpath.build"],
        env={**os.environ, "CC": str(tmp_path / "no-such-cc")}, capture_output=True, text=True, timeout=300,
        check=False, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fast path not built: "), p.stdout + p.stderr
    assert fastpath.BUILT == any(Path(fastpath.__file__).parent.glob("_ring*.so"))  # left as it was


@needs_build
def test_guest_ram_changing_between_walks_maps_the_same_buffers(monkeypatch):
    """A region added while the queue runs (vhost-user SET_MEM_TABLE): the compiled path, which
    slices the one region itself, falls back to map() and returns what the Python path returns."""
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(fastpath, "ACTIVE", compiled)
        ram = bytearray(random.Random(1).randbytes(RAM))
        for c in range(3):  # three chains: 16 readable bytes, 100 writable
            _DESC.pack_into(ram, 32 * c, SCRATCH + 256 * c, 16, 1, 2 * c + 1)
            _DESC.pack_into(ram, 32 * c + 16, SCRATCH + 256 * c + 16, 100, 2, 0)
            struct.pack_into("<H", ram, AVAIL_AT - BASE + 4 + 2 * c, 2 * c)
        struct.pack_into("<H", ram, AVAIL_AT - BASE + 2, 3)
        memory = FlatGuestMemory([MemoryRegion(BASE, ram)])
        q = Virtqueue(0, 8)
        q.set_size(8)
        q.set_addresses(DESC_AT, AVAIL_AT, USED_AT)
        q.set_ready(True)
        q.activate(memory, event_idx=False, indirect=False)
        start = _address(memoryview(ram)) or 0
        seen = []
        for step in range(3):
            chain = q.pop()
            seen.append([(_address(v, start), len(v)) for v in chain.readable + chain.writable])
            if step == 0:
                memory.add_region(MemoryRegion(1 << 30, bytearray(4096)))  # now two regions
            if step == 1:
                memory.remove_region(1 << 30)  # one again (a new single_region)
        results.append(seen)
    assert results[1] == results[0]
    assert results[0][2] == [(SCRATCH - BASE + 512, 16), (SCRATCH - BASE + 528, 100)]


def test_a_device_step_that_is_not_built_says_how_to_build_it(tmp_path, monkeypatch):
    pkg = tmp_path / "vdm_fake_dev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    step = fastpath.device_step("vdm_fake_dev", "_step", "vdm_fake_dev.build")
    assert (step.ffi, step.lib, step.built, step.active) == (None, None, False, False)
    if fastpath.ACTIVE:
        assert step.status == "python (not built: python3 -m vdm_fake_dev.build)"
    else:
        assert step.status.startswith("python (core fast path off: ")
    (pkg / f"_step{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not an ELF file")
    importlib.invalidate_caches()
    broken = fastpath.device_step("vdm_fake_dev", "_step", "vdm_fake_dev.build")
    assert not broken.built
    if fastpath.ACTIVE:
        assert broken.status.startswith("python (does not import: "), broken.status


def test_a_device_step_that_imports_is_used_when_the_core_path_is(tmp_path, monkeypatch):
    pkg = tmp_path / "vdm_fake_dev2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_step.py").write_text("ffi = object()\nlib = object()\n")  # (stands for a cffi module)
    monkeypatch.syspath_prepend(str(tmp_path))
    step = fastpath.device_step("vdm_fake_dev2", "_step", "vdm_fake_dev2.build")
    assert step.built and step.lib is not None
    if fastpath.ACTIVE:
        assert step.active and step.status == "compiled"
    else:
        assert not step.active and step.status.startswith("python (core fast path off: ")
