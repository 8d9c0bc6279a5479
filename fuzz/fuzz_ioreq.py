#!/usr/bin/env python3
"""Fuzz target: Xen ioreq handling (vdm_xen.ioreq) against the simulated Xen (vdm_xen.sim).

The device model's IOREQ server is started once against :class:`vdm_xen.sim.SimXen` (a 1 MiB
guest with canary pages around its RAM), with a recording handler claimed as an MMIO window and
another as a port window. Each input is a series of hostile ioreq slots -- any state, type, size,
address, data, count, data_is_ptr, direction and direction flag, on either vCPU -- served the way
an event-channel notification would serve them (``serve_slot``).

Invariants: a slot not in state READY is left exactly as it was; a READY slot always ends in
IORESP_READY with only ``data`` and the state changed, and the vCPU's event channel notified (a
vCPU is never left waiting); a plain read answers within the access size; a handler only sees
accesses of 1, 2, 4 or 8 bytes inside its window; a rep read with data_is_ptr changes guest RAM
only inside the buffer the request names, and nothing outside guest RAM; each request finishes in
bounded time (rep counts are capped).
"""

from __future__ import annotations

import sys
import time

import common

MMIO_BASE = 0x0200_0000
PIO_BASE = 0x3F8
WINDOW = 0x200
PIO_WINDOW = 8
RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 20

_state: dict = {}


class Checking:
    """A handler that records violations of what it may be asked."""

    def __init__(self, size: int, violations: list[str]) -> None:
        self.size = size
        self.violations = violations
        self.accesses = 0

    def _check(self, offset: int, size: int) -> None:
        self.accesses += 1
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.size:
            self.violations.append(f"handler access {offset}+{size} outside its {self.size}-byte window")

    def read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        return 0xA5A5_A5A5_A5A5_A5A5 ^ offset

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        if value >> (8 * size):
            self.violations.append(f"write of 0x{value:x} wider than {size} bytes")


def _setup():
    if _state:
        return _state
    from vdm_xen.sim import SimXen
    from vdm_xen.vmm import XenVmm

    sim = SimXen(nr_vcpus=2, ram_size=RAM_SIZE, ram_base=RAM_BASE)
    backend = XenVmm(sim.lib(), sim.domid)
    backend.start()
    server = backend.server
    violations: list[str] = []
    server.claim(MMIO_BASE, WINDOW, Checking(WINDOW, violations), "fuzz-mmio", mmio=True)
    server.claim(PIO_BASE, PIO_WINDOW, Checking(PIO_WINDOW, violations), "fuzz-pio", mmio=False)
    xen_server = next(iter(sim.servers.values()))
    _state.update(sim=sim, backend=backend, server=server, violations=violations, xs=xen_server)
    return _state


def _changed_range(before: bytes, after: memoryview) -> tuple[int, int] | None:
    if before == after:
        return None
    lo = next(i for i in range(0, len(before), 4096) if before[i : i + 4096] != after[i : i + 4096])
    hi = next(i for i in range(len(before) - 4096, -1, -4096) if before[i : i + 4096] != after[i : i + 4096])
    lo += next(j for j in range(4096) if before[lo + j] != after[lo + j])
    hi += max(j for j in range(4096) if before[hi + j] != after[hi + j]) + 1
    return lo, hi


def one_input(data: bytes) -> None:
    import atheris
    from vdm_xen.abi import STATE_IOREQ_NONE, STATE_IOREQ_READY, STATE_IORESP_READY, ffi

    st = _setup()
    opened = common.watch_files()
    opened.clear()
    sim, server, violations, xs = st["sim"], st["server"], st["violations"], st["xs"]
    page = ffi.cast("ioreq_t *", ffi.from_buffer(xs.page))
    ram = sim.ram
    fdp = atheris.FuzzedDataProvider(data)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        vcpu = fdp.ConsumeIntInRange(0, 1)
        slot = page + vcpu  # a pointer, so ffi.buffer sees the 32 bytes
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind <= 1:
            addr = MMIO_BASE + fdp.ConsumeIntInRange(-16, WINDOW + 16)
        elif kind == 2:
            addr = PIO_BASE + fdp.ConsumeIntInRange(-4, PIO_WINDOW + 4)
        else:
            addr = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        state = STATE_IOREQ_READY if fdp.ConsumeIntInRange(0, 5) else fdp.ConsumeIntInRange(0, 15)
        flag_bits = fdp.ConsumeIntInRange(0, 15)  # data_is_ptr, dir, df, pad
        rtype = (1, 1, 0, 8, 7, 2, fdp.ConsumeIntInRange(0, 255))[fdp.ConsumeIntInRange(0, 6)]
        size = (1, 2, 4, 8, fdp.ConsumeIntInRange(0, 0xFFFFFFFF))[fdp.ConsumeIntInRange(0, 4)]
        count = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
        ptr = flag_bits & 1
        if ptr and fdp.ConsumeIntInRange(0, 3):
            value = RAM_BASE + fdp.ConsumeIntInRange(-64, RAM_SIZE + 64)
        else:
            value = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        slot.addr, slot.data, slot.count, slot.size, slot.type = addr, value, count, size, rtype
        slot.flags = state | flag_bits << 4
        before_slot = bytes(ffi.buffer(slot))
        is_read = bool(flag_bits & 2)
        snapshot = bytes(ram.region.view) if ptr and is_read else None
        port = xs.ports[vcpu]
        woken = sim.vcpu_notified(sim.domid, port)
        woken.clear()
        t0 = time.monotonic()
        served = server.serve_slot(vcpu)
        took = time.monotonic() - t0
        assert took < 2.0, f"one ioreq took {took:.1f} s"
        if state != STATE_IOREQ_READY:
            assert not served and bytes(ffi.buffer(slot)) == before_slot, "a slot not READY was touched"
            assert not woken.is_set(), "a vCPU was notified for a slot not READY"
        else:
            assert served
            assert slot.flags & 0xF == STATE_IORESP_READY, f"slot left in state {slot.flags & 0xF}"
            assert slot.flags >> 4 == flag_bits, "the device model changed the request's flags"
            assert (slot.addr, slot.count, slot.size, slot.type) == (addr, count, size, rtype)
            assert woken.is_set(), "the vCPU was never notified"
            if is_read and not ptr and rtype in (0, 1) and size in (1, 2, 4, 8) and count <= 1:
                assert slot.data >> (8 * size) == 0, f"read answer 0x{slot.data:x} wider than {size} bytes"
            if snapshot is not None:
                changed = _changed_range(snapshot, ram.region.view)
                if changed is not None:
                    n = min(count, 4096)
                    step = -size if flag_bits & 4 else size
                    ends = (value, value + (n - 1) * step)
                    lo, hi = min(ends) - RAM_BASE, max(ends) + size - RAM_BASE
                    assert lo <= changed[0] and changed[1] <= hi, (
                        f"rep read changed RAM {changed} outside its buffer [{lo}, {hi})"
                    )
        slot.flags = STATE_IOREQ_NONE  # what the vCPU does after taking the answer
    ram.check_guards()
    assert not common.data_files(opened), f"files opened while serving ioreqs: {opened}"
    if violations:
        found = list(violations)
        violations.clear()
        raise AssertionError("; ".join(found))


if __name__ == "__main__":
    common.run(one_input, ("vdm_xen.ioreq", "vdm_xen.memory", "vdm_xen.sim", "vdm_xen.vmm"))
    sys.exit(0)
