"""What the ``vdm dm-only`` tests against the simulated Xen (vdm_xen.sim) share: the guest's view of
a virtio-mmio window, virtio-blk request headers, a blk device spec, and dm-only serving the
devices of a command line on a thread until the test stops it as SIGTERM would.

Used by tests/xen/test_dm_only.py, tests/core/test_control_dm_only.py and the rng plugin's dm-only
test. Importing it skips the importing test module where vdm-xen is not installed.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from typing import Any, Iterator

import pytest

sim_mod = pytest.importorskip("vdm_xen.sim", reason="vdm-xen is not installed")
dm_only = pytest.importorskip("vdm_xen.dm_only", reason="vdm-xen is not installed")
SimXen = sim_mod.SimXen

#: the virtio-mmio window the tests put their first device at
BASE = 0x0200_0000
T_IN, T_OUT, T_FLUSH = 0, 1, 4


class GuestMmio:
    """The guest's view of a virtio-mmio window: every access is an ioreq, vCPUs taking turns."""

    def __init__(self, sim: SimXen, base: int) -> None:
        self.sim, self.base, self.n = sim, base, 0
        self.vcpus = sim.domains[sim.domid].nr_vcpus

    def read(self, offset: int, size: int) -> int:
        self.n += 1
        return self.sim.mmio_read(self.base + offset, size, vcpu=self.n % self.vcpus)

    def write(self, offset: int, size: int, value: int) -> None:
        self.n += 1
        self.sim.mmio_write(self.base + offset, size, value, vcpu=self.n % self.vcpus)


def hdr(rtype: int, sector: int = 0) -> bytes:
    """A virtio-blk request header."""
    return struct.pack("<IIQ", rtype, 0, sector)


def blk_plugins() -> Any:
    """The plugin set with vdm-blk only (skips the test where it is not installed)."""
    from vdm.plugins import load_plugins

    p = load_plugins(only=["blk"])
    if "blk" not in p.devices:
        pytest.skip("vdm-blk is not installed")
    return p


def blk_spec(plugins: Any, image: Any, base: int = BASE, irq: int = 33) -> Any:
    """``--device blk,path=IMAGE,base=...,irq=...`` as dm-only parses it."""
    devices = {n: dt for n, (dt, _) in plugins.devices.items()}
    return dm_only.parse_device(f"blk,path={image},base={base:#x},irq={irq}", devices)


@contextlib.contextmanager
def serving(sim: SimXen, specs: list[Any], **serve: Any) -> Iterator[dict[str, Any]]:
    """``dm_only.serve`` of ``specs`` (SPIs; ``serve``: more of its keyword arguments) on a thread,
    ready when this yields; on leaving, its stop pipe is written as SIGTERM's handler would, and it
    must end saying "stopped by signal". Yields the dict the thread fills ("why", or "error")."""
    r, w = os.pipe()
    ready = threading.Event()
    out: dict[str, Any] = {}

    def dm() -> None:
        try:
            out["why"] = dm_only.serve(
                sim.lib(), sim.domid, specs, r, irq_kind="spi", on_ready=lambda vmm: ready.set(), **serve
            )
        except BaseException as e:
            out["error"] = e
            ready.set()

    t = threading.Thread(target=dm)
    t.start()
    try:
        try:
            assert ready.wait(10) and "error" not in out, out
            yield out
        finally:
            os.write(w, b"x")
            t.join(20)
        assert out.get("why") == "stopped by signal", out
    finally:
        if not t.is_alive():  # else it may still read r: leave both open
            os.close(r)
            os.close(w)
