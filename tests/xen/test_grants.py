"""``grant_usage=1`` end to end against the simulated Xen: a guest whose virtio driver sits behind
Xen's ``xen,grant-dma`` (Linux's CONFIG_XEN_VIRTIO) grants every ring and buffer to dom0 and puts
grant addresses (bit 63 + reference) in the queue registers and descriptors. ``vdm dm-only`` offers
VIRTIO_F_ACCESS_PLATFORM for such a device, maps those grants through libxengnttab (never foreign
pages), and counts both kinds in its exit line. A bad or unmappable grant is the guest's error:
that device needs a reset, nothing stays mapped, vdm keeps serving; a guest that dies mid-request
ends vdm with everything released."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
from vdm.device import F_ACCESS_PLATFORM
from vdm.testing.driver import VirtioTestDriver
from vdm_xen import dm_only
from vdm_xen.abi import GRANT_ADDR_BIT
from vdm_xen.sim import SimXen

from .test_dm_only import BASE, T_IN, T_OUT, GuestMmio, hdr, image, plugins  # noqa: F401 (fixtures)

VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2


class GrantDma:
    """The guest's grant DMA ops (Linux's xen-grant-dma): each allocation the driver makes is
    granted to dom0 (consecutive references) and known to the driver by its grant address only."""

    def __init__(self, sim: SimXen) -> None:
        self.sim = sim
        self.regions: list[tuple[int, int, int]] = []  # (grant address, guest address, size)

    def alloc(self, size: int, align: int = 16) -> int:
        phys = self.sim.ram.alloc(size, align)
        dma = self.sim.grant_range(phys, size)
        self.regions.append((dma, phys, size))
        return dma

    def _phys(self, addr: int, length: int) -> int:
        for dma, phys, size in self.regions:
            if dma <= addr and addr + length <= dma + size:
                return phys + addr - dma
        raise AssertionError(f"the driver touched 0x{addr:x}+{length}, which it never allocated")

    def read(self, addr: int, length: int) -> bytes:
        return self.sim.ram.read(self._phys(addr, length), length)

    def write(self, addr: int, data: bytes) -> None:
        self.sim.ram.write(self._phys(addr, len(data)), data)

    def free(self, addr: int, size: int) -> None:
        for r in self.regions:
            if r[0] == addr:
                self.regions.remove(r)
                self.sim.revoke_grants(addr, size)
                self.sim.ram.free(r[1], size)
                return


@dataclasses.dataclass
class Dm:
    """``dm_only.serve`` running in a thread for one blk device."""

    sim: SimXen
    thread: threading.Thread
    out: dict[str, Any]
    stats: dict[str, str]
    stop_w: int

    def stop(self) -> str:
        os.write(self.stop_w, b"x")
        self.thread.join(20)
        assert not self.thread.is_alive()
        assert "error" not in self.out, self.out
        return str(self.out["why"])


@contextmanager
def serving(plugins: Any, sim: SimXen, image: Path, *, grants: bool) -> Iterator[Dm]:  # noqa: F811
    devices = {n: dt for n, (dt, _) in plugins.devices.items()}
    spec = dm_only.parse_device(f"blk,path={image},base={BASE},irq=33", devices)
    spec = dataclasses.replace(spec, grants=grants)
    r, w = os.pipe()
    ready = threading.Event()
    out: dict[str, Any] = {}
    stats: dict[str, str] = {}

    def body() -> None:
        try:
            out["why"] = dm_only.serve(
                sim.lib(), sim.domid, [spec], r, irq_kind="spi", tick=0.05,
                on_ready=lambda vmm: ready.set(), stats=stats,
            )  # fmt: skip
        except BaseException as e:
            out["error"] = e
        ready.set()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    try:
        assert ready.wait(10) and "error" not in out, out
        yield Dm(sim, t, out, stats, w)
    finally:
        if t.is_alive():
            os.write(w, b"x")
            t.join(20)
        os.close(r)
        os.close(w)


def _counts(stats: dict[str, str]) -> tuple[int, int]:
    m = re.fullmatch(
        r"(\d+) grant mappings \(\d+ pages\), (\d+) foreign mappings \(\d+ pages\)", stats["memory"]
    )
    assert m, stats
    return int(m.group(1)), int(m.group(2))


def _until(what: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _grant_driver(sim: SimXen) -> VirtioTestDriver:
    drv = VirtioTestDriver(None, ram=GrantDma(sim), transport=GuestMmio(sim, BASE))  # type: ignore[arg-type]
    assert drv.device_features() >> F_ACCESS_PLATFORM & 1, "grant_usage=1 but ACCESS_PLATFORM not offered"
    drv.init(queues=[0])  # every offered feature, ACCESS_PLATFORM included
    return drv


@pytest.mark.parametrize("grants", [True, False], ids=["grant_usage=1", "grant_usage=0"])
def test_grant_usage_device_is_served_through_grants_only(plugins: Any, image: Path, grants: bool) -> None:  # noqa: F811
    sim = SimXen(nr_vcpus=1)
    try:
        with serving(plugins, sim, image, grants=grants) as dm:
            if grants:
                drv = _grant_driver(sim)
                assert all(addr & GRANT_ADDR_BIT for addr, _, _ in drv.ram.regions)  # type: ignore[attr-defined]
            else:
                drv = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, BASE))  # type: ignore[arg-type]
                assert not drv.device_features() >> F_ACCESS_PLATFORM & 1  # only behind grant-dma
                drv.init(queues=[0])
            data = os.urandom(2 * 4096 + 512)
            assert drv.request(0, [hdr(T_OUT, 8), data], [1], timeout=20).data == b"\x00"
            assert drv.request(0, [hdr(T_IN, 8)], [len(data), 1], timeout=20).data == data + b"\x00"
            assert dm.stop() == "stopped by signal"
        with open(image, "rb") as f:
            f.seek(8 * 512)
            assert f.read(len(data)) == data
        grant_maps, foreign_maps = _counts(dm.stats)
        # the exit log's traffic line: every register access and kick was an ioreq, every
        # completion an interrupt on the device's SPI
        m = re.fullmatch(r"(\d+) ioreqs \((\d+) reads, (\d+) writes\), interrupts raised: irq 33: (\d+)",
                         dm.stats["traffic"])  # fmt: skip
        assert m, dm.stats
        ioreqs, reads, writes, irqs = map(int, m.groups())
        assert ioreqs == reads + writes and reads >= 4 and writes >= 12 and irqs == 2, dm.stats
        if grants:  # rings and buffers: grants only
            assert grant_maps >= 3 + 2 * 3 and foreign_maps == 0, dm.stats
        else:
            assert grant_maps == 0 and foreign_maps > 0, dm.stats
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def _post_raw(drv: VirtioTestDriver, descs: list[tuple[int, int, int]], first: int = 200) -> None:
    """A hand-made chain of (addr, len, flags) at descriptor ``first``..., published and kicked."""
    for i, (addr, length, flags) in enumerate(descs):
        last = i == len(descs) - 1
        drv.write_desc(0, first + i, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), first + i + 1)
    drv.publish(0, first)
    drv.kick(0)


def _one_guest_error(caplog: Any, before: int) -> list[str]:
    return [r.getMessage() for r in caplog.records[before:] if r.levelno >= logging.WARNING]


def test_a_bad_grant_reference_is_a_guest_error(plugins: Any, image: Path, caplog: Any) -> None:  # noqa: F811
    sim = SimXen(nr_vcpus=1)
    caplog.set_level(logging.INFO)
    try:
        with serving(plugins, sim, image, grants=True) as dm:
            drv = _grant_driver(sim)
            assert drv.request(0, [hdr(T_IN, 0)], [512, 1], timeout=20).data[-1] == 0
            ram: GrantDma = drv.ram  # type: ignore[assignment]
            head, status = ram.alloc(16), ram.alloc(1)
            ram.write(head, hdr(T_IN, 0))
            mapped = dict(sim.grant_maps_live)  # the rings
            logs = len(caplog.records)
            never_granted = GRANT_ADDR_BIT | (sim.next_grant + 1000) << 12
            _post_raw(
                drv,
                [(head, 16, 0), (never_granted, 4096, VIRTQ_DESC_F_WRITE), (status, 1, VIRTQ_DESC_F_WRITE)],
            )
            assert _until(lambda: drv.needs_reset), "the device did not ask for a reset"
            assert sim.grant_maps_live == mapped  # the header's mapping was released too
            lines = _one_guest_error(caplog, logs)
            assert len(lines) == 1 and "grant" in lines[0], lines
            # the device is the guest's to reset; vdm keeps serving it
            drv.init(queues=[0])
            assert drv.request(0, [hdr(T_IN, 0)], [512, 1], timeout=20).data[-1] == 0
            assert dm.stop() == "stopped by signal"
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_a_grant_map_failure_fails_the_device_not_vdm(plugins: Any, image: Path, caplog: Any) -> None:  # noqa: F811
    sim = SimXen(nr_vcpus=1)
    try:
        with serving(plugins, sim, image, grants=True) as dm:
            drv = _grant_driver(sim)
            mapped = dict(sim.grant_maps_live)
            logs = len(caplog.records)
            # dom0's gntdev refuses the next mapping (ENOMEM: out of grant mapping slots)
            sim.on_grant_map = lambda refs: errno.ENOMEM
            drv.post(0, [hdr(T_OUT, 0), b"x" * 512], [1])
            drv.kick(0)
            assert _until(lambda: drv.needs_reset), "the device did not ask for a reset"
            assert sim.grant_maps_live == mapped
            lines = _one_guest_error(caplog, logs)
            assert len(lines) == 1 and "errno 12" in lines[0], lines
            sim.on_grant_map = None
            drv.init(queues=[0])
            assert drv.request(0, [hdr(T_IN, 0)], [512, 1], timeout=20).data[-1] == 0
            assert dm.stop() == "stopped by signal"
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_a_domu_that_disappears_mid_request(plugins: Any, image: Path) -> None:  # noqa: F811
    sim = SimXen(nr_vcpus=1, xenstore=False)
    try:
        with serving(plugins, sim, image, grants=True) as dm:
            drv = _grant_driver(sim)
            died = threading.Event()

            def die(refs: list[int]) -> None:  # the header is mapped; the guest dies before its data is
                if not died.is_set() and len(refs) > 1:
                    died.set()
                    sim.destroy_domain()

            sim.on_grant_map = die
            drv.post(0, [hdr(T_OUT, 0), os.urandom(8192)], [1])
            try:
                drv.kick(0)
            except Exception:  # a dead guest's own access may fail; vdm must not
                pass
            dm.thread.join(20)
            assert died.is_set()
            assert not dm.thread.is_alive() and dm.out.get("why") == "dom1 is gone", dm.out
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()
