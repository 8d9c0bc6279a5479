"""Fixtures: a simulated Xen, and a device model serving it from a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from vdm_xen.sim import SimXen
from vdm_xen.vmm import XenVmm


class Recorder:
    """An MMIO handler that remembers every access and answers reads from its registers."""

    def __init__(self, fill: int = 0) -> None:
        self.regs: dict[int, int] = {}
        self.log: list[tuple[str, int, int, int]] = []
        self.fill = fill
        self.during: Any = None  # called inside each access (to look at the slot state)

    def read(self, offset: int, size: int) -> int:
        if self.during is not None:
            self.during()
        self.log.append(("r", offset, size, 0))
        return self.regs.get(offset, self.fill)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.during is not None:
            self.during()
        self.log.append(("w", offset, size, value))
        self.regs[offset] = value


class Served:
    """A XenVmm started against ``sim`` and served from a thread until :meth:`stop`."""

    def __init__(self, sim: SimXen, irq_kind: str = "spi") -> None:
        self.sim = sim
        self.lib = sim.lib()
        self.backend = XenVmm(self.lib, sim.domid, irq_kind=irq_kind)
        self.backend.start()
        self._r, self._w = os.pipe()
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def run(self) -> Served:
        def loop() -> None:
            try:
                assert self.backend.server is not None
                self.backend.server.serve(self._r)
            except BaseException as e:  # pragma: no cover - reported by stop()
                self.errors.append(e)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def claim(self, base: int, handler: Any, size: int = 0x200) -> None:
        assert self.backend.vmm_register_mmio(base, size, handler, f"dev@{base:x}")

    def stop(self) -> None:
        if self.thread is not None:
            os.write(self._w, b"x")
            self.thread.join(10)
            assert not self.thread.is_alive()
            self.thread = None
        self.backend.close()
        os.close(self._r)
        os.close(self._w)
        assert not self.errors, self.errors


@pytest.fixture
def sim() -> Iterator[SimXen]:
    x = SimXen(nr_vcpus=2)
    yield x
    x.close()


@pytest.fixture
def served(sim: SimXen) -> Iterator[Served]:
    s = Served(sim).run()
    yield s
    s.stop()
    assert sim.leaks() == []
    assert sim.violations == []
