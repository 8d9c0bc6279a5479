"""Replays of what Linux's 8250 driver does to a PC serial port, expecting 16550A answers.

The sequences follow drivers/tty/serial/8250/8250_port.c (autoconfig, autoconfig_16550a,
size_fifo, serial8250_do_startup's THRE tests) register access by register access; the
interrupt-driven session mimics serial8250_handle_irq.
"""

from __future__ import annotations

from vdm.interrupts import RecordingIrqLine
from vdm_console.backends import MemoryBackend
from vdm_console.uart import Uart16550

RX = TX = 0
IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 1, 2, 2, 3, 4, 5, 6, 7
EFR = 2  # EFR lives at offset 2 when LCR is 0xBF on the chips that have one

LCR_CONF_MODE_A = 0x80  # DLAB
LCR_CONF_MODE_B = 0xBF
FCR_ENABLE_FIFO, FCR_CLEAR_RCVR, FCR_CLEAR_XMIT, FCR7_64BYTE, FCR_R_TRIG_10 = 0x01, 0x02, 0x04, 0x20, 0x80
MCR_DTR, MCR_RTS, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x08, 0x10
IER_RDI, IER_THRI, IER_RLSI, IER_UUE = 0x01, 0x02, 0x04, 0x40
IIR_NO_INT = 0x01
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40


class Io:
    def __init__(self, uart: Uart16550) -> None:
        self.uart = uart

    def inb(self, off: int) -> int:
        return self.uart.read(off, 1)

    def outb(self, off: int, value: int) -> None:
        self.uart.write(off, 1, value)

    def dl_read(self) -> int:
        return self.inb(0) | self.inb(1) << 8

    def dl_write(self, value: int) -> None:
        self.outb(0, value & 0xFF)
        self.outb(1, value >> 8)


def size_fifo(io: Io) -> int:
    old_lcr = io.inb(LCR)
    io.outb(LCR, 0)
    old_fcr = io.inb(FCR)  # really IIR: FCR is write-only
    old_mcr = io.inb(MCR)
    io.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    io.outb(MCR, MCR_LOOP)
    io.outb(LCR, LCR_CONF_MODE_A)
    old_dl = io.dl_read()
    io.dl_write(1)
    io.outb(LCR, 0x03)
    for count in range(256):
        io.outb(TX, count)
    count = 0
    while io.inb(LSR) & LSR_DR and count < 256:
        io.inb(RX)
        count += 1
    io.outb(FCR, old_fcr)
    io.outb(MCR, old_mcr)
    io.outb(LCR, LCR_CONF_MODE_A)
    io.dl_write(old_dl)
    io.outb(LCR, old_lcr)
    return count


def autoconfig_16550a(io: Io) -> str:
    kind = "16550A"
    io.outb(LCR, LCR_CONF_MODE_A)
    if io.inb(EFR) == 0:
        return "16650 or FSL64/Motorola (EFR with DLAB)"
    io.outb(LCR, LCR_CONF_MODE_B)
    if io.inb(EFR) == 0:
        return "EFRv2 (16650V2/16850/16C950)"
    io.outb(LCR, 0)
    status1 = io.inb(MCR)
    io.outb(LCR, 0xE0)
    status2 = io.inb(0x02)  # EXCR1 on a NatSemi SuperIO
    if not (status2 ^ status1) & MCR_LOOP:
        io.outb(LCR, 0)
        io.outb(MCR, status1 ^ MCR_LOOP)
        io.outb(LCR, 0xE0)
        status2 = io.inb(0x02)
        io.outb(LCR, 0)
        io.outb(MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550A"
    io.outb(LCR, 0)
    io.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    s1 = io.inb(IIR) >> 5
    io.outb(FCR, FCR_ENABLE_FIFO)
    io.outb(LCR, LCR_CONF_MODE_A)
    io.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    s2 = io.inb(IIR) >> 5
    io.outb(FCR, FCR_ENABLE_FIFO)
    io.outb(LCR, 0)
    if s1 == 6 and s2 == 7:
        return "16750"
    iersave = io.inb(IER)
    io.outb(IER, iersave & ~IER_UUE)
    if not io.inb(IER) & IER_UUE:
        io.outb(IER, iersave | IER_UUE)
        if io.inb(IER) & IER_UUE:
            return "XScale"
    io.outb(IER, iersave)
    if size_fifo(io) == 64:
        return "U6_16550A"
    return kind


def autoconfig(io: Io) -> str:
    scratch = io.inb(IER)
    io.outb(IER, 0)
    scratch2 = io.inb(IER) & 0x0F
    io.outb(IER, 0x0F)
    scratch3 = io.inb(IER) & 0x0F
    io.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"
    save_mcr = io.inb(MCR)
    save_lcr = io.inb(LCR)
    io.outb(MCR, MCR_LOOP | 0x0A)
    status1 = io.inb(MSR) & 0xF0
    io.outb(MCR, save_mcr)
    if status1 != 0x90:
        return f"LOOP test failed ({status1:02x})"
    io.outb(LCR, LCR_CONF_MODE_B)
    io.outb(EFR, 0)
    io.outb(LCR, 0)
    io.outb(FCR, FCR_ENABLE_FIFO)
    kind = {0: "8250/16450", 1: "unknown", 2: "16550", 3: None}[io.inb(IIR) >> 6]
    if kind is None:
        kind = autoconfig_16550a(io)
    io.outb(LCR, save_lcr)
    # reset the UART: MCR back, clear FIFOs, read RX, IER off
    io.outb(MCR, save_mcr)
    clear_fifos(io)
    io.inb(RX)
    io.outb(IER, 0)
    return kind


def clear_fifos(io: Io) -> None:
    io.outb(FCR, FCR_ENABLE_FIFO)
    io.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    io.outb(FCR, 0)


def make():
    irq = RecordingIrqLine()
    backend = MemoryBackend()
    return Uart16550(irq, backend), irq, backend


def test_autoconfig_detects_16550a():
    uart, irq, backend = make()
    io = Io(uart)
    assert autoconfig(io) == "16550A"
    assert size_fifo(io) == 16
    assert backend.output == b""  # the probe's loopback traffic never reached the line
    assert irq.edges == 0  # nor did it interrupt: OUT2 was never set outside loopback


def test_autoconfig_leaves_the_port_usable():
    uart, _, backend = make()
    io = Io(uart)
    io.outb(SCR, 0x3C)
    autoconfig(io)
    assert io.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    io.outb(TX, ord("!"))
    assert backend.output == b"!"
    backend.inject(b"?")
    assert io.inb(LSR) & LSR_DR and io.inb(RX) == ord("?")
    assert io.inb(SCR) == 0x3C


def test_startup_thre_checks_find_no_bugs():
    uart, _, _ = make()
    io = Io(uart)
    autoconfig(io)
    clear_fifos(io)
    for reg in (LSR, RX, IIR, MSR):
        io.inb(reg)
    assert io.inb(LSR) != 0xFF  # the "LSR safety check"
    io.outb(LCR, 0x03)
    io.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    # UART_BUG_THRE: THRE must be re-asserted every time ETBEI is enabled while idle
    io.outb(IER, IER_THRI)
    iir1 = io.inb(IIR)
    io.outb(IER, 0)
    io.outb(IER, IER_THRI)
    iir = io.inb(IIR)
    io.outb(IER, 0)
    bug_thre = not iir1 & IIR_NO_INT and iir & IIR_NO_INT
    assert not bug_thre
    # UART_BUG_TXEN: enabling THRI must raise THRE at once
    io.outb(IER, IER_THRI)
    lsr = io.inb(LSR)
    iir = io.inb(IIR)
    io.outb(IER, 0)
    assert not (lsr & LSR_TEMT and iir & IIR_NO_INT)


class Driver:
    """An interrupt-driven 8250 driver in miniature (serial8250_handle_irq and friends)."""

    def __init__(self, io: Io, irq: RecordingIrqLine) -> None:
        self.io = io
        self.irq = irq
        self.xmit = bytearray()
        self.received = bytearray()
        self.ier = 0
        self.interrupts = 0

    def startup(self) -> None:
        io = self.io
        io.outb(LCR, LCR_CONF_MODE_A)
        io.dl_write(1)  # 115200 baud
        io.outb(LCR, 0x03)
        io.outb(FCR, FCR_ENABLE_FIFO | FCR_R_TRIG_10)
        io.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
        self.ier = IER_RLSI | IER_RDI
        io.outb(IER, self.ier)

    def start_tx(self, data: bytes) -> None:
        self.xmit += data
        if not self.ier & IER_THRI:
            self.ier |= IER_THRI
            self.io.outb(IER, self.ier)

    def handle_irq(self) -> None:
        io = self.io
        self.interrupts += 1
        for _ in range(512):
            iir = io.inb(IIR)
            if iir & IIR_NO_INT:
                return
            lsr = io.inb(LSR)
            while lsr & LSR_DR:
                self.received.append(io.inb(RX))
                lsr = io.inb(LSR)
            if lsr & LSR_THRE and self.ier & IER_THRI:
                for _ in range(16):  # tx_loadsz of a 16550A
                    if not self.xmit:
                        break
                    io.outb(TX, self.xmit.pop(0))
                if not self.xmit:
                    self.ier &= ~IER_THRI
                    io.outb(IER, self.ier)
        raise AssertionError("interrupt storm: IIR never cleared")

    def run(self) -> None:
        """Take interrupts while the line is asserted (what the PIC would deliver)."""
        for _ in range(10000):
            if not self.irq.level:
                return
            self.handle_irq()
        raise AssertionError("IRQ line stuck high")


def test_interrupt_driven_transmit_and_receive():
    uart, irq, backend = make()
    io = Io(uart)
    autoconfig(io)
    drv = Driver(io, irq)
    drv.startup()
    assert irq.level is False
    message = b"Linux version 6.x (vdm@guest) #1 SMP\r\n" * 20
    drv.start_tx(message)
    drv.run()
    assert bytes(backend.output) == message
    assert irq.level is False
    # a single key press (below the 8-byte trigger) arrives through the character timeout
    backend.inject(b"r")
    assert irq.level is True
    drv.run()
    assert drv.received == b"r"
    # a paste larger than the FIFO arrives whole, in order
    paste = bytes(range(32, 127)) * 3
    backend.inject(paste)
    drv.run()
    assert bytes(drv.received) == b"r" + paste
    assert irq.level is False
    assert uart.lsr_errors == 0
