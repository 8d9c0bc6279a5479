"""The IOREQ server against the simulated Xen: the state machine, ports, ranges, teardown."""

from __future__ import annotations

import errno
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vdm_xen.abi import (
    IOREQ_FLAGS_OFFSET,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_TYPE_TIMEOFFSET,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    ffi,
    with_state,
)
from vdm_xen.ioreq import IoreqServer, XenError
from vdm_xen.sim import GuestCrashed, SimXen, UnclaimedAccess
from vdm_xen.vmm import XenVmm

from .conftest import Recorder, Served

BASE = 0x0200_0000


def test_accesses_reach_the_handler_relative_to_the_window(served: Served) -> None:
    sim = served.sim
    dev = Recorder(fill=0x1122_3344_5566_7788)
    served.claim(BASE, dev)
    for vcpu in (0, 1):
        for size in (1, 2, 4, 8):
            assert sim.mmio_read(BASE + 0x10, size, vcpu=vcpu) == 0x1122_3344_5566_7788 & (
                (1 << 8 * size) - 1
            )
    sim.mmio_write(BASE + 0x1F8, 8, 0xDEAD_BEEF_0BAD_F00D, vcpu=1)
    sim.mmio_write(BASE + 0x70, 1, 0x1FF)  # the guest's data beyond the access size is not passed on
    assert dev.log[-2:] == [("w", 0x1F8, 8, 0xDEAD_BEEF_0BAD_F00D), ("w", 0x70, 1, 0xFF)]
    assert sim.requests_done == 10
    assert served.backend.server is not None and served.backend.server.requests == 10


def test_slot_is_inprocess_while_the_handler_runs_and_none_after(served: Served) -> None:
    sim = served.sim
    states: list[int] = []
    server = next(iter(sim.servers.values()))
    dev = Recorder()
    dev.during = lambda: states.append(server.page[32 * 1 + IOREQ_FLAGS_OFFSET] & 0xF)
    served.claim(BASE, dev)
    sim.mmio_read(BASE, 4, vcpu=1)
    sim.mmio_write(BASE, 4, 7, vcpu=1)
    assert states == [STATE_IOREQ_INPROCESS, STATE_IOREQ_INPROCESS]
    assert server.page[32 + IOREQ_FLAGS_OFFSET] & 0xF == STATE_IOREQ_NONE


def test_one_port_per_vcpu_bound_after_enable(sim: SimXen) -> None:
    s = Served(sim)
    try:
        calls = sim.calls
        assert calls.index("xendevicemodel_set_ioreq_server_state") < calls.index(
            "xenevtchn_bind_interdomain"
        )
        assert calls.index("xenforeignmemory_map_resource") < calls.index(
            "xendevicemodel_set_ioreq_server_state"
        )
        assert calls.count("xenevtchn_bind_interdomain") == 2
        server = next(iter(sim.servers.values()))
        bound = {peer for peer in sim.port_binding}
        assert bound == {(sim.domid, p) for p in server.ports}
        assert s.backend.server is not None and len(set(s.backend.server.ports)) == 2
    finally:
        s.stop()
    assert sim.leaks() == []


def test_windows_are_claimed_end_inclusive(served: Served) -> None:
    sim = served.sim
    a, b = Recorder(fill=0xA), Recorder(fill=0xB)
    served.claim(BASE, a)
    served.claim(BASE + 0x200, b)  # EEXIST if the first claim had reached one byte too far
    server = next(iter(sim.servers.values()))
    assert sorted(server.mmio) == [(BASE, BASE + 0x1FF), (BASE + 0x200, BASE + 0x3FF)]
    assert sim.mmio_read(BASE + 0x1FF, 1) == 0xA
    assert sim.mmio_read(BASE + 0x200, 1) == 0xB
    with pytest.raises(UnclaimedAccess):
        sim.mmio_read(BASE + 0x400, 1)
    with pytest.raises(UnclaimedAccess):  # straddles the end of the claimed space
        sim.mmio_read(BASE + 0x3FC, 8)


def test_overlapping_claim_is_refused_without_side_effects(served: Served) -> None:
    served.claim(BASE, Recorder())
    with pytest.raises(ValueError):
        served.claim(BASE + 0x100, Recorder())
    server = next(iter(served.sim.servers.values()))
    assert server.mmio == [(BASE, BASE + 0x1FF)]


def test_handler_that_raises_still_answers(served: Served) -> None:
    class Broken:
        def read(self, offset: int, size: int) -> int:
            raise RuntimeError("device bug")

        def write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("device bug")

    served.claim(BASE, Broken())
    assert served.sim.mmio_read(BASE, 4) == 0xFFFF_FFFF
    served.sim.mmio_write(BASE, 4, 1)
    assert served.sim.mmio_read(BASE + 4, 2, vcpu=1) == 0xFFFF


def test_odd_requests_are_answered(served: Served) -> None:
    sim = served.sim
    dev = Recorder(fill=5)
    served.claim(BASE, dev)
    assert sim.request(IOREQ_TYPE_COPY, BASE, 3, read=True) == 0xFFFFFF  # no such access size
    assert sim.request(IOREQ_TYPE_PCI_CONFIG, 0x10 << 32, 4, read=True) == 0xFFFF_FFFF
    sim.request(IOREQ_TYPE_TIMEOFFSET, 0, 8, data=123, read=False)
    assert sim.request(42, BASE, 4, read=True, vcpu=1) == 0xFFFF_FFFF
    assert dev.log == []


def test_invalidate_drops_cached_foreign_mappings(served: Served) -> None:
    sim = served.sim
    mem = served.backend.memory
    assert mem is not None
    sim.ram.write(0x4000_2000, b"abc")
    view = mem.map(0x4000_2000, 3)
    assert bytes(view) == b"abc"
    mem.unmap(view)
    assert sim.foreign_maps  # kept in the cache
    sim.invalidate(vcpu=1)
    assert sim.foreign_maps == {}
    assert mem.read(0x4000_2000, 3) == b"abc"  # and mapped again on demand


def test_rep_string_io_with_guest_buffers(sim: SimXen) -> None:
    s = Served(sim).run()
    try:
        dev = Recorder()
        s.backend.vmm_register_pio(0x3F8, 8, dev, "uart") or pytest.skip("port I/O is x86-only")
        buf = 0x4000_3000
        sim.ram.write(buf, b"hi!")
        sim.request(IOREQ_TYPE_PIO, 0x3F8, 1, data=buf, read=False, count=3, data_is_ptr=1)
        assert [v for _, _, _, v in dev.log] == [ord("h"), ord("i"), ord("!")]
        dev.regs[0] = 0x41
        sim.request(IOREQ_TYPE_PIO, 0x3F8, 1, data=buf + 0x10, read=True, count=2, data_is_ptr=1)
        assert sim.ram.read(buf + 0x10, 2) == b"AA"
        sim.request(IOREQ_TYPE_PIO, 0x3F8, 1, data=0x10, read=False, count=2, data_is_ptr=1)  # not RAM
    finally:
        s.stop()
    assert sim.leaks() == [] and sim.violations == []


def test_legacy_gfn_mapping_on_x86_when_resource_mapping_is_missing() -> None:
    sim = SimXen(arch="x86", resource_mapping=False)
    try:
        s = Served(sim, irq_kind="isa").run()
        s.claim(BASE, Recorder(fill=9))
        assert sim.mmio_read(BASE, 4) == 9
        assert "xendevicemodel_get_ioreq_server_info" in sim.calls
        s.stop()
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_arm_without_resource_mapping_fails_and_leaves_nothing() -> None:
    sim = SimXen(arch="arm", resource_mapping=False)
    try:
        b = XenVmm(sim.lib(), sim.domid)
        with pytest.raises(XenError) as e:
            b.start()
        assert e.value.errno == errno.EOPNOTSUPP
        b.close()
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_teardown_order_and_nothing_left(sim: SimXen) -> None:
    s = Served(sim).run()
    s.claim(BASE, Recorder())
    s.claim(BASE + 0x200, Recorder())
    sim.mmio_read(BASE, 4)
    assert s.backend.memory is not None
    s.backend.memory.read(0x4000_0000, 16)
    n = len(sim.calls)
    s.stop()
    tail = sim.calls[n:]
    order = [
        "xendevicemodel_unmap_io_range_from_ioreq_server",
        "xenevtchn_unbind",
        "xendevicemodel_set_ioreq_server_state",
        "xenforeignmemory_unmap_resource",
        "xendevicemodel_destroy_ioreq_server",
        "xenforeignmemory_unmap",
        "xenforeignmemory_close",
    ]
    assert [tail.index(c) for c in order] == sorted(tail.index(c) for c in order)
    assert tail.count("xendevicemodel_unmap_io_range_from_ioreq_server") == 2
    assert tail.count("xenevtchn_unbind") == 2
    assert sim.leaks() == [] and sim.violations == []


def test_a_dead_domain_still_tears_down_cleanly(sim: SimXen) -> None:
    s = Served(sim).run()
    s.claim(BASE, Recorder())
    sim.destroy_domain()
    assert not s.backend.domain_alive()
    s.stop()
    assert sim.leaks() == []


# ---- the simulator catches device models that break Xen's rules ------------------------------------


class _Bad(IoreqServer):
    mode = ""

    def serve_slot(self, vcpu: int) -> bool:
        req = self._page[vcpu]
        if self.mode == "none":  # answer by going back to NONE
            req.flags = with_state(req.flags, STATE_IOREQ_NONE)
        elif self.mode == "silent":  # answer but never notify
            req.flags = with_state(req.flags, 3)
            return True
        self.lib.xenevtchn_notify(self.xce, self._vcpu_port[vcpu])
        return True


@pytest.mark.parametrize(("mode", "message"), [("none", "Weird HVM ioreq state"), ("silent", "no answer")])
def test_simulator_crashes_the_guest_for_a_broken_state_machine(mode: str, message: str) -> None:
    sim = SimXen(timeout=0.5)
    try:
        s = Served(sim)
        assert s.backend.server is not None
        s.backend.server.__class__ = _Bad
        _Bad.mode = mode
        s.run()
        s.claim(BASE, Recorder())
        with pytest.raises(GuestCrashed, match=message):
            sim.mmio_read(BASE, 4)
        assert any(message in v for v in sim.violations)
        s.stop()
    finally:
        sim.close()


def test_simulator_refuses_binding_before_enable_and_foreign_servers() -> None:
    sim = SimXen()
    try:
        lib = sim.lib()
        dmod = lib.xendevicemodel_open(lib.quiet_logger, 0)
        fmem = lib.xenforeignmemory_open(lib.quiet_logger, 0)
        xce = lib.xenevtchn_open(lib.quiet_logger, 0)
        sid = ffi.new("ioservid_t *")
        assert lib.xendevicemodel_create_ioreq_server(dmod, sim.domid, 0, sid) == 0
        addr = ffi.new("void **")
        fres = lib.xenforeignmemory_map_resource(fmem, sim.domid, 0, sid[0], 1, 1, addr, 3, 0)
        page = ffi.cast("ioreq_t *", addr[0])
        assert page[0].vp_eport == 0  # not written before enable
        assert lib.xenevtchn_bind_interdomain(xce, sim.domid, page[0].vp_eport) == -1
        assert lib.errno == errno.EINVAL
        # another domain may not map this server's page
        other = sim.lib(domid=7)
        ofmem = other.xenforeignmemory_open(other.quiet_logger, 0)
        oaddr = ffi.new("void **")
        assert other.xenforeignmemory_map_resource(ofmem, sim.domid, 0, sid[0], 1, 1, oaddr, 3, 0) == ffi.NULL
        assert other.errno == errno.EPERM
        # frame 0 (the buffered page) does not exist with BUFIOREQ_OFF
        assert lib.xenforeignmemory_map_resource(fmem, sim.domid, 0, sid[0], 0, 1, oaddr, 3, 0) == ffi.NULL
        assert lib.errno == errno.ENOENT
        with pytest.raises(OverflowError):  # converted like cffi converts for the real function
            lib.xendevicemodel_nr_vcpus(dmod, 1 << 16, ffi.new("unsigned int *"))
        with pytest.raises(TypeError):
            lib.xendevicemodel_nr_vcpus(dmod, 1, ffi.new("int *"))
        lib.xenforeignmemory_unmap_resource(fmem, fres)
        lib.xendevicemodel_destroy_ioreq_server(dmod, sim.domid, sid[0])
        for close, h in ((lib.xenevtchn_close, xce), (lib.xenforeignmemory_close, fmem)):
            close(h)
        lib.xendevicemodel_close(dmod)
        other.xenforeignmemory_close(ofmem)
        assert sim.leaks() == []
        assert any("dom7 mapped ioreq server" in v for v in sim.violations)
    finally:
        sim.close()


def test_simulator_reports_leaks(sim: SimXen) -> None:
    s = Served(sim)
    assert s.backend.memory is not None
    s.backend.memory.read(0x4000_0000, 4)
    leaks = sim.leaks()
    assert any("ioreq servers not destroyed" in x for x in leaks)
    assert any("event channels still bound" in x for x in leaks)
    assert any("foreign mapping" in x for x in leaks)
    s.stop()
    assert sim.leaks() == []


# ---- an untrusted guest ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reqs=st.lists(
        st.tuples(
            st.sampled_from([IOREQ_TYPE_COPY, IOREQ_TYPE_PIO, IOREQ_TYPE_PCI_CONFIG, 3, 7, 8, 15, 255]),
            st.integers(0, 0x1F8),
            st.sampled_from([0, 1, 2, 3, 4, 8, 16, 1 << 31]),
            st.booleans(),
            st.integers(0, 2**64 - 1),
            st.integers(0, 5),
            st.integers(0, 1),
            st.integers(0, 1),
            st.integers(0, 1),
        ),
        max_size=12,
    )
)
def test_any_request_is_answered_and_never_breaks_the_server(served: Served, reqs: list[tuple]) -> None:
    sim = served.sim
    if not any(True for _ in served.backend.server.mmio):  # type: ignore[union-attr]
        served.claim(BASE, Recorder(fill=0x55))
        served.backend.vmm_register_pio(0x60, 0x200, Recorder(fill=0x66), "pio")
    for rtype, off, size, read, data, count, ptr, df, vcpu in reqs:
        addr = (BASE if rtype == IOREQ_TYPE_COPY else 0x60) + off
        try:
            sim.request(
                rtype, addr, size, data=data, read=read, vcpu=vcpu, count=count, data_is_ptr=ptr, df=df
            )
        except UnclaimedAccess:
            continue  # Xen would not have forwarded it
    assert sim.violations == []
    # still serving: the fixture (and the recorder) lives across examples, so an earlier
    # example may have written any register; write a fresh value and read it back
    marker = 0x5A000000 | len(reqs)
    sim.mmio_write(BASE + 0x1F0, 4, marker)
    assert sim.mmio_read(BASE + 0x1F0, 4) == marker
    assert served.thread is not None and served.thread.is_alive()


def test_requests_from_two_vcpus_at_once(served: Served) -> None:
    sim = served.sim
    dev = Recorder(fill=3)
    served.claim(BASE, dev)
    errors: list[BaseException] = []

    def guest(vcpu: int) -> None:
        try:
            for i in range(200):
                sim.mmio_write(BASE + 8 * vcpu, 4, i, vcpu=vcpu)
                assert sim.mmio_read(BASE + 0x100, 4, vcpu=vcpu) == 3
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guest, args=(v,)) for v in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sim.requests_done == 800
    assert dev.regs[0] == 199 and dev.regs[8] == 199
