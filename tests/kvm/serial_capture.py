"""A minimal 16550-style transmitter for tests: captures what the guest writes to COM1.

Only for tests until vdm-console's UART is used here: it implements what Linux's 8250 driver needs
to transmit (THR, IER, IIR with the THR-empty interrupt, LCR/DLAB, LSR always "transmitter empty",
MCR/scratch storage) and raises the interrupt line on THR-empty when the guest enabled it. Nothing
is ever received.
"""

from __future__ import annotations

import threading
from typing import Callable

IER_THRI = 0x02
IIR_NO_INT, IIR_THRI = 0x01, 0x02
LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60


class SerialCapture:
    """An :class:`vdm.iorange.IoHandler` for 8 ports at 0x3f8; ``irq(level)`` drives IRQ 4."""

    def __init__(self, irq: Callable[[bool], None] | None = None, echo: Callable[[str], None] | None = None):
        self.irq = irq
        self.echo = echo
        self.out = bytearray()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.ier = self.lcr = self.mcr = self.scr = self.dll = self.dlm = 0
        self.thre_pending = False

    def _update_irq(self) -> None:
        if self.irq is not None:
            self.irq(bool(self.ier & IER_THRI and self.thre_pending))

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset == 0:
                return self.dll if self.lcr & LCR_DLAB else 0
            if offset == 1:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == 2:
                if self.ier & IER_THRI and self.thre_pending:
                    self.thre_pending = False  # reading IIR clears the THR-empty interrupt
                    self._update_irq()
                    return 0xC0 | IIR_THRI
                return 0xC0 | IIR_NO_INT
            if offset == 3:
                return self.lcr
            if offset == 4:
                return self.mcr
            if offset == 5:
                return LSR_THRE_TEMT
            if offset == 6:
                return 0xB0  # DCD, DSR, CTS
            if offset == 7:
                return self.scr
            return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self.lock:
            if offset == 0:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                else:
                    self.out.append(value)
                    if self.echo is not None:
                        self.echo(chr(value))
                    self.thre_pending = True
                    self.changed.notify_all()
                    self._update_irq()
            elif offset == 1:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                else:
                    self.ier = value & 0x0F
                    self.thre_pending = True  # enabling THRI with an empty THR interrupts at once
                    self._update_irq()
            elif offset == 3:
                self.lcr = value
            elif offset == 4:
                self.mcr = value
            elif offset == 7:
                self.scr = value

    def text(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace")
