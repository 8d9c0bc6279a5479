"""The simulated guest: its vCPUs sending ioreqs (blocking until the device model answers),
the pages it grants, the interrupts it sees.
"""

from __future__ import annotations

import time
from typing import Callable

from ..abi import (
    GRANT_ADDR_BIT,
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PIO,
    PAGE_SIZE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    ffi,
    flags_state,
    make_flags,
)
from .errors import GuestCrashed, UnclaimedAccess
from .state import SimServer


class GuestSide:
    """What the guest does; mixed into :class:`~vdm_xen.sim.xen.SimXen`."""

    # ---- the guest --------------------------------------------------------------------------------

    def grant_range(self, addr: int, length: int, readonly: bool = False) -> int:
        """The guest grants the pages of [addr, addr+length) (consecutive references); returns
        the grant DMA address a Linux guest would put in a descriptor."""
        d = self.domains[self.domid]
        first = addr // PAGE_SIZE
        last = (addr + max(length, 1) - 1) // PAGE_SIZE
        with self.lock:
            gref0 = self.next_grant
            for i, pfn in enumerate(range(first, last + 1)):
                d.grants[gref0 + i] = (pfn, readonly)
            self.next_grant += last - first + 1
        return GRANT_ADDR_BIT | (gref0 << 12) | (addr % PAGE_SIZE)

    def revoke_grants(self, dma_addr: int, length: int) -> bool:
        """gnttab_end_foreign_access: fails (False) while the backend still maps a page."""
        d = self.domains[self.domid]
        gref0 = (dma_addr & ~GRANT_ADDR_BIT) >> 12
        n = ((dma_addr % PAGE_SIZE) + max(length, 1) - 1) // PAGE_SIZE + 1
        with self.lock:
            if any(d.grant_maps.get(g, 0) for g in range(gref0, gref0 + n)):
                return False
            for g in range(gref0, gref0 + n):
                d.grants.pop(g, None)
        return True

    def _route(self, rtype: int, addr: int, size: int) -> list[SimServer]:
        d = self.domid
        with self.lock:
            servers = [s for s in self.servers.values() if s.domid == d and s.enabled]
        if rtype not in (IOREQ_TYPE_COPY, IOREQ_TYPE_PIO):
            return servers  # INVALIDATE (and, here, any other type) goes to every server
        for s in servers:
            ranges = s.mmio if rtype == IOREQ_TYPE_COPY else s.pio
            for a, b in ranges:
                if a <= addr and addr + size - 1 <= b:
                    return [s]
        raise UnclaimedAccess(f"dom{d}: {'MMIO' if rtype == IOREQ_TYPE_COPY else 'port'} 0x{addr:x}/{size}")

    def request(
        self,
        rtype: int,
        addr: int,
        size: int,
        *,
        data: int = 0,
        read: bool,
        vcpu: int = 0,
        count: int = 1,
        data_is_ptr: int = 0,
        df: int = 0,
    ) -> int:
        """vCPU ``vcpu`` sends one ioreq and blocks until the device model answers; returns data."""
        if not self.domains[self.domid].alive:
            raise GuestCrashed("the domain is dead")
        value = data
        for s in self._route(rtype, addr, size):
            value = self._one(s, vcpu, rtype, addr, size, data, read, count, data_is_ptr, df)
        return value

    def _one(self, s: SimServer, vcpu: int, rtype: int, addr: int, size: int, data: int, read: bool,
             count: int, data_is_ptr: int, df: int) -> int:  # fmt: skip
        slot = ffi.cast("ioreq_t *", ffi.from_buffer(s.page)) + vcpu
        port = s.ports[vcpu]
        with self._vcpu_locks[vcpu]:
            state = flags_state(slot.flags)
            if state != STATE_IOREQ_NONE:
                self._crash(f"vCPU {vcpu}: device model set bad IO state {state} (slot not NONE)")
            slot.addr, slot.data, slot.count, slot.size, slot.type = addr, data, count, size, rtype
            woken = self._woken[(s.domid, port)]
            woken.clear()
            slot.flags = make_flags(STATE_IOREQ_READY, data_is_ptr, IOREQ_READ if read else 0, df)
            with self.lock:
                binding = self.port_binding.get((s.domid, port))
            if binding is None:
                self._crash(f"vCPU {vcpu}: no device model bound event channel {port}; the vCPU hangs")
            self.deliver_event(*binding)
            seen = STATE_IOREQ_READY
            deadline = time.monotonic() + self.timeout
            while True:
                notified = woken.wait(0.0005)
                state = flags_state(slot.flags)
                if state != seen:
                    self.state_trace.append((vcpu, state))
                    if state < seen or state not in (STATE_IOREQ_INPROCESS, STATE_IORESP_READY):
                        self._crash(f"vCPU {vcpu}: Weird HVM ioreq state transition {seen} -> {state}")
                    seen = state
                if notified:
                    woken.clear()
                    if state == STATE_IORESP_READY:
                        break
                    # READY/INPROCESS: Xen keeps waiting (a spurious notification)
                if time.monotonic() > deadline:
                    self._crash(f"vCPU {vcpu}: no answer within {self.timeout}s (state {state})")
            result = int(slot.data)
            slot.flags = make_flags(STATE_IOREQ_NONE)
            self.requests_done += 1
            mask = (1 << (8 * min(size, 8))) - 1
            return result & mask if read and not data_is_ptr else result

    def _crash(self, what: str) -> None:
        self.violation(what)
        with self.lock:
            self.domains[self.domid].alive = False
        raise GuestCrashed(what)

    def mmio_read(self, addr: int, size: int = 4, vcpu: int = 0) -> int:
        return self.request(IOREQ_TYPE_COPY, addr, size, read=True, vcpu=vcpu)

    def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        self.request(IOREQ_TYPE_COPY, addr, size, data=value, read=False, vcpu=vcpu)

    def pio_read(self, port: int, size: int = 1, vcpu: int = 0) -> int:
        return self.request(IOREQ_TYPE_PIO, port, size, read=True, vcpu=vcpu)

    def invalidate(self, vcpu: int = 0) -> None:
        """What Xen sends after the guest's memory map changed (x86 decrease_reservation)."""
        self.request(IOREQ_TYPE_INVALIDATE, 0, 8, read=False, vcpu=vcpu)

    def wait_irq(self, predicate: Callable[[list[tuple[str, int, int]]], bool], timeout: float = 5.0) -> None:
        with self.irq_cond:
            if not self.irq_cond.wait_for(lambda: predicate(self.irq_log), timeout):
                raise TimeoutError(f"interrupts seen: {self.irq_log[-10:]}")
