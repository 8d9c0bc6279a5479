"""A 16550A UART (the PC's ttyS0..3), as Linux's interrupt-driven 8250 driver expects it.

Registers (offset from the base port; DLAB is LCR bit 7)::

    0  RBR (read) / THR (write)      DLL when DLAB=1
    1  IER                           DLM when DLAB=1
    2  IIR (read) / FCR (write)
    3  LCR    4  MCR    5  LSR    6  MSR    7  SCR

The line is infinitely fast: a byte written to THR is handed to the backend at once, so THR and
the transmitter are empty again right away (LSR THRE and TEMT read 1), and a THR write lowers the
THR-empty interrupt and raises it again -- an edge, as for real hardware once the byte has left.

Receiving is lossless: bytes are *pulled* from the backend only while the RX FIFO (16 bytes, or
the single RBR in 16450 mode) has room, so a guest that does not read leaves input waiting in the
backend. Overrun (LSR OE) can still happen where the sender is the guest itself (loopback).

Interrupts, highest priority first (IIR bits 3..1), each only while enabled in IER:

====================  =====  ==============================  =====================================
source                IIR    raised when                     cleared by
====================  =====  ==============================  =====================================
receiver line status  0x06   OE/PE/FE/BI in LSR              reading LSR
received data         0x04   RX FIFO reached trigger level   reading RBR below the trigger level
character timeout     0x0C   FIFO below trigger, no more     reading RBR until the FIFO is empty
                             input waiting (see below)
THR empty             0x02   THR became empty, or ETBEI      reading IIR (when it reports THRE),
                             was enabled while it is empty   writing THR
modem status          0x00   MSR delta bits set              reading MSR
====================  =====  ==============================  =====================================

Character timeout stands for "four character times without input": an emulated line has no
character time, so the condition is "the FIFO holds fewer bytes than the trigger level and the
backend has nothing more waiting". That is what lets Linux see a single typed key with the
8-byte trigger it programs.

LCR's frame format (word length, parity, stop bits) and the divisor are kept for the guest to
read back but do not change the bytes: all 8 bits pass, as in QEMU and kvmtool, so programs that
write to 0x3f8 without programming LCR (power-on 5N1) still print.

On a PC the UART's interrupt output reaches the interrupt controller only while MCR OUT2 is set
(and never in loopback, where OUT2 is looped back internally); ``pc_out2_gate`` models that gate,
which is why Linux sets OUT2 before it enables interrupts.

Thread safety: vCPU threads call :meth:`read` / :meth:`write`, and the backend's input thread
calls in when bytes arrive; one lock serialises them. Lock order is UART then backend.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from vdm.interrupts import IrqLine
    from vdm.vmm import Vmm

    from .backends.base import ConsoleBackend

__all__ = ["COM_PORTS", "FIFO_SIZE", "Uart16550", "attach_uart"]

log = logging.getLogger(__name__)

#: the legacy PC serial ports: name -> (base port, IRQ)
COM_PORTS = {
    "com1": (0x3F8, 4),
    "com2": (0x2F8, 3),
    "com3": (0x3E8, 4),
    "com4": (0x2E8, 3),
}
FIFO_SIZE = 16
#: RX trigger levels selected by FCR bits 7..6
TRIGGER_LEVELS = (1, 4, 8, 14)

# register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08

IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_TIMEOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04

LCR_DLAB = 0x80

MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10

LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_FIFOE = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
)
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Uart16550:
    """A 16550A UART behind 8 I/O ports; an :class:`vdm.iorange.IoHandler`.

    :param irq: the interrupt line (``set_level(bool)``); driven only when its level changes.
    :param backend: where transmitted bytes go and received bytes come from (None: nowhere).
    :param modem_inputs: MSR bits 7..4 outside loopback (default: DCD, DSR and CTS asserted --
        a terminal is attached and ready).
    :param pc_out2_gate: gate the interrupt output with MCR OUT2, as PC boards do.
    :param port: the first of its 8 I/O ports and ``irq_number`` its interrupt line's number, as
        placed by :func:`attach_uart` (None for a UART not placed on a bus, as in tests).
    """

    def __init__(
        self,
        irq: IrqLine,
        backend: Optional[ConsoleBackend] = None,
        *,
        name: str = "ttyS0",
        modem_inputs: int = MSR_DCD | MSR_DSR | MSR_CTS,
        pc_out2_gate: bool = True,
        port: Optional[int] = None,
        irq_number: Optional[int] = None,
    ) -> None:
        self.irq = irq
        self.port = port
        self.irq_number = irq_number
        self.backend = backend
        self.name = name
        self.modem_inputs = modem_inputs & 0xF0
        self.pc_out2_gate = pc_out2_gate
        self._lock = threading.Lock()
        self._level = False
        self.dll, self.dlm = 12, 0  # 9600 baud; reset leaves the divisor alone on real parts
        self._reset_locked()
        if backend is not None:
            backend.start(self._on_input)

    # ---- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Master reset (the VM rebooted): registers to their power-on values."""
        with self._lock:
            self._reset_locked()
            self._refill()
            self._update_irq()

    def _reset_locked(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fifo_enabled = False
        self.trigger = 1
        self.rx = bytearray()
        self._rbr_last = 0
        self.lsr_errors = 0
        self.thre_pending = False
        self.msr_delta = 0
        #: bytes transmitted and received (for tests and statistics)
        self.tx_count = 0
        self.rx_count = 0

    def _msr_inputs(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                    | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        return self.modem_inputs

    # ---- interrupts -----------------------------------------------------------------------

    def _timeout_condition(self) -> bool:
        if not (self.fifo_enabled and 0 < len(self.rx) < self.trigger):
            return False
        backend = self.backend
        return backend is None or bool(self.mcr & MCR_LOOP) or backend.pending() == 0

    def _interrupt_id(self) -> int:
        ier = self.ier
        if ier & IER_RLSI and self.lsr_errors & LSR_ERRORS:
            return IIR_RLSI
        if ier & IER_RDI and self.rx:
            if not self.fifo_enabled or len(self.rx) >= self.trigger:
                return IIR_RDI
            if self._timeout_condition():
                return IIR_TIMEOUT
        if ier & IER_THRI and self.thre_pending:
            return IIR_THRI
        if ier & IER_MSI and self.msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT
        if self.pc_out2_gate and (not self.mcr & MCR_OUT2 or self.mcr & MCR_LOOP):
            level = False
        if level != self._level:
            self._level = level
            self.irq.set_level(level)

    @property
    def irq_level(self) -> bool:
        """The level this UART drives its interrupt line to."""
        return self._level

    # ---- receive ----------------------------------------------------------------------------

    def _receive(self, byte: int) -> None:
        """A character arrived from the line (the backend or loopback)."""
        self.rx_count += 1
        if self.fifo_enabled:
            if len(self.rx) >= FIFO_SIZE:
                self.lsr_errors |= LSR_OE  # the shift register's character is lost
                return
            self.rx.append(byte)
        else:
            if self.rx:
                self.lsr_errors |= LSR_OE  # RBR overwritten
                self.rx[0] = byte
            else:
                self.rx.append(byte)

    def _room(self) -> int:
        if self.fifo_enabled:
            return FIFO_SIZE - len(self.rx)
        return 0 if self.rx else 1

    def _refill(self) -> None:
        """Pull waiting input from the backend into the free part of the RX FIFO."""
        backend = self.backend
        if backend is None or self.mcr & MCR_LOOP:
            return  # in loopback the receiver is cut off from the line; input waits
        room = self._room()
        if room <= 0:
            return
        for b in backend.read(room):
            self._receive(b)

    def _on_input(self) -> None:
        with self._lock:
            self._refill()
            self._update_irq()

    # ---- transmit ---------------------------------------------------------------------------

    def _transmit(self, value: int) -> None:
        self.tx_count += 1
        if self.mcr & MCR_LOOP:
            self._receive(value)
        elif self.backend is not None:
            self.backend.write(bytes((value,)))

    # ---- registers --------------------------------------------------------------------------

    def _read_reg(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == RBR:
            if dlab:
                return self.dll
            if self.rx:
                self._rbr_last = self.rx.pop(0)
                self._refill()
            return self._rbr_last
        if off == IER:
            return self.dlm if dlab else self.ier
        if off == IIR:
            iid = self._interrupt_id()
            if iid == IIR_THRI:
                self.thre_pending = False
            return iid | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            value = LSR_THRE | LSR_TEMT | self.lsr_errors | (LSR_DR if self.rx else 0)
            self.lsr_errors = 0
            return value
        if off == MSR:
            value = self._msr_inputs() | self.msr_delta
            self.msr_delta = 0
            return value
        if off == SCR:
            return self.scr
        return 0xFF  # not ours: a floating bus

    def _write_reg(self, off: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if off == THR:
            if dlab:
                self.dll = value
                return
            self.thre_pending = False
            self._update_irq()  # the THRE interrupt drops when THR is written...
            self._transmit(value)
            self.thre_pending = True  # ...and comes back when the byte has left
        elif off == IER:
            if dlab:
                self.dlm = value
                return
            old, self.ier = self.ier, value & 0x0F
            if self.ier & IER_THRI and not old & IER_THRI:
                self.thre_pending = True  # THR is empty: enabling ETBEI interrupts at once
        elif off == FCR:
            enable = bool(value & FCR_ENABLE)
            if enable != self.fifo_enabled:
                self.rx.clear()  # switching FIFO mode resets both FIFOs
            self.fifo_enabled = enable
            if enable:  # the other bits are programmed only together with FIFO enable
                if value & FCR_CLEAR_RX:
                    self.rx.clear()
                self.trigger = TRIGGER_LEVELS[value >> 6]
                # FCR_CLEAR_TX: the transmitter is always empty
            self._refill()
        elif off == LCR:
            self.lcr = value
        elif off == MCR:
            old_in = self._msr_inputs()
            was_loop = self.mcr & MCR_LOOP
            self.mcr = value & 0x1F
            new_in = self._msr_inputs()
            changed = old_in ^ new_in
            if changed & MSR_CTS:
                self.msr_delta |= MSR_DCTS
            if changed & MSR_DSR:
                self.msr_delta |= MSR_DDSR
            if changed & MSR_DCD:
                self.msr_delta |= MSR_DDCD
            if old_in & MSR_RI and not new_in & MSR_RI:
                self.msr_delta |= MSR_TERI
            if was_loop and not self.mcr & MCR_LOOP:
                self._refill()
        elif off == SCR:
            self.scr = value
        # LSR and MSR writes (factory test on some parts) are ignored

    # ---- IoHandler --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Guest ``in`` from base+``offset``; wider accesses read consecutive registers."""
        if not 1 <= size <= 8:
            return 0
        value = 0
        with self._lock:
            for i in range(size):
                off = offset + i
                b = self._read_reg(off) if 0 <= off <= 7 else 0xFF
                value |= b << (8 * i)
            self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Guest ``out`` to base+``offset``; wider accesses write consecutive registers."""
        if not 1 <= size <= 8:
            return
        with self._lock:
            for i in range(size):
                off = offset + i
                if 0 <= off <= 7:
                    self._write_reg(off, (value >> (8 * i)) & 0xFF)
            self._update_irq()

    def close(self) -> None:
        """Stop the backend (its input thread and files)."""
        if self.backend is not None:
            self.backend.close()


def attach_uart(
    vmm: Vmm, backend: Optional[ConsoleBackend], port: str = "com1", irq: Optional[int] = None
) -> Uart16550:
    """Create a UART on legacy port ``port`` (com1..com4) of ``vmm`` (a :class:`vdm.vmm.Vmm`)."""
    base, default_irq = COM_PORTS[port]
    line = irq if irq is not None else default_irq
    uart = Uart16550(
        vmm.irq_line(line), backend, name=f"ttyS{int(port[3:]) - 1}", port=base, irq_number=line
    )
    vmm.register_pio(base, 8, uart, f"uart-{port}")
    return uart
