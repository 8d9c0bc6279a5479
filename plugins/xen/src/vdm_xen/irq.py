"""Interrupts into a Xen guest: Arm SPIs (``set_irq_level``), x86 ISA IRQs and MSIs."""

from __future__ import annotations

import logging
import platform
from typing import Any

from vdm.interrupts import IrqLine

__all__ = ["XenIrqLine", "default_irq_kind"]

log = logging.getLogger(__name__)


def default_irq_kind() -> str:
    """``spi`` on Arm (libxl gives virtio-mmio devices SPIs 33..43), ``isa`` on x86."""
    return "isa" if platform.machine() in ("x86_64", "i386", "i686", "AMD64") else "spi"


class XenIrqLine(IrqLine):
    """One guest interrupt line driven through libxendevicemodel.

    ``kind`` is ``spi`` (``xendevicemodel_set_irq_level``, Arm; libxl declares virtio-mmio SPIs
    edge-rising, so every raise is a new interrupt) or ``isa`` (``xendevicemodel_set_isa_irq_level``,
    x86 IRQ 0..15). A failing call is logged once, never raised: a device completing a request must
    not die because the guest went away.
    """

    def __init__(self, lib: Any, dmod: Any, domid: int, irq: int, kind: str | None = None) -> None:
        kind = kind or default_irq_kind()
        if kind not in ("spi", "isa"):
            raise ValueError(f"unknown interrupt kind {kind!r}")
        if kind == "isa" and not 0 <= irq < 16:
            raise ValueError(f"x86 ISA interrupt {irq} is not 0..15")
        if kind == "spi" and not 32 <= irq < 1020:
            raise ValueError(f"Arm SPI {irq} is not 32..1019")
        self.lib, self.dmod, self.domid, self.irq, self.kind = lib, dmod, domid, irq, kind
        self._warned = False
        #: how many times the line was raised (an edge each on Arm; never decremented)
        self.raised = 0

    def set_level(self, level: bool) -> None:
        lvl = 1 if level else 0
        self.raised += lvl
        if self.kind == "spi":
            rc = self.lib.xendevicemodel_set_irq_level(self.dmod, self.domid, self.irq, lvl)
        else:
            rc = self.lib.xendevicemodel_set_isa_irq_level(self.dmod, self.domid, self.irq, lvl)
        if rc != 0 and not self._warned:
            self._warned = True
            log.warning(
                "dom%d: cannot set %s %d to %d: errno %d",
                self.domid,
                self.kind,
                self.irq,
                lvl,
                self.lib.errno,
            )
