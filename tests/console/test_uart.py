"""The 16550A UART at register level, against the datasheet's behaviour and Linux's 8250 driver."""

from __future__ import annotations

import threading

import pytest
from vdm import vmmimpl
from vdm.interrupts import RecordingIrqLine
from vdm.vmm import Vmm
from vdm_console.backends import MemoryBackend
from vdm_console.uart import COM_PORTS, Uart16550, attach_uart

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

DR, OE, THRE, TEMT = 0x01, 0x02, 0x20, 0x40
OUT2, LOOP = 0x08, 0x10


class Port:
    """The guest's view: inb/outb on a UART, plus its IRQ line and backend."""

    def __init__(self, **kw) -> None:
        self.irq = RecordingIrqLine()
        self.backend = MemoryBackend()
        self.uart = Uart16550(self.irq, self.backend, **kw)

    def inb(self, off: int) -> int:
        v = self.uart.read(off, 1)
        assert 0 <= v <= 0xFF
        return v

    def outb(self, off: int, v: int) -> None:
        self.uart.write(off, 1, v)

    def iid(self) -> int:
        return self.inb(IIR) & 0x0F

    def rx_all(self, limit: int = 10000) -> bytes:
        out = bytearray()
        while self.inb(LSR) & DR and len(out) < limit:
            out.append(self.inb(RBR))
        return bytes(out)


@pytest.fixture
def port():
    p = Port()
    yield p
    p.uart.close()


def test_power_on_values(port):
    assert port.inb(IER) == 0
    assert port.inb(IIR) == 0x01  # no interrupt, FIFOs off
    assert port.inb(LCR) == 0
    assert port.inb(MCR) == 0
    assert port.inb(LSR) == THRE | TEMT
    assert port.irq.level is False


def test_scratch_register_holds_any_byte(port):
    for v in (0x00, 0x55, 0xAA, 0xFF, 0x5A):
        port.outb(SCR, v)
        assert port.inb(SCR) == v


def test_divisor_latch_access(port):
    port.outb(LCR, 0x83)  # DLAB, 8N1
    port.outb(DLL, 0x01)
    port.outb(DLM, 0x02)
    assert port.inb(DLL) == 0x01 and port.inb(DLM) == 0x02
    assert port.backend.output == b""  # a DLL write is not a transmitted character
    assert port.uart.ier == 0  # a DLM write does not touch IER
    port.outb(LCR, 0x03)
    assert port.inb(IER) == 0
    port.outb(IER, 0x05)
    assert port.inb(IER) == 0x05
    port.outb(THR, ord("A"))
    assert port.backend.output == b"A"
    port.outb(LCR, 0x83)
    assert (port.inb(DLL), port.inb(DLM)) == (0x01, 0x02)  # kept across DLAB toggles
    assert port.inb(LCR) == 0x83


def test_ier_upper_bits_read_zero(port):
    port.outb(IER, 0xFF)
    assert port.inb(IER) == 0x0F


def test_mcr_upper_bits_read_zero(port):
    port.outb(MCR, 0xFF)
    assert port.inb(MCR) == 0x1F


def test_thre_interrupt_raised_when_enabled_cleared_on_iir_read(port):
    port.outb(MCR, OUT2)
    assert port.iid() == 0x01
    port.outb(IER, 0x02)
    assert port.irq.level is True
    assert port.iid() == 0x02  # THRE -- and reading IIR clears it
    assert port.irq.level is False
    assert port.iid() == 0x01


def test_thre_interrupt_cleared_by_thr_write_then_reasserted(port):
    port.outb(MCR, OUT2)
    port.outb(IER, 0x02)
    edges = port.irq.edges
    port.outb(THR, ord("x"))
    # the write dropped the interrupt and the (instant) transmission raised it again: a new edge
    assert port.irq.edges == edges + 1
    assert port.irq.level is True
    assert port.backend.output == b"x"
    assert port.iid() == 0x02


def test_thre_reasserts_when_etbei_reenabled(port):
    # Linux's serial8250_do_startup UART_BUG_THRE check: IER=THRI, read IIR, IER=0, IER=THRI.
    port.outb(IER, 0x02)
    iir1 = port.inb(IIR)
    port.outb(IER, 0)
    port.outb(IER, 0x02)
    iir2 = port.inb(IIR)
    port.outb(IER, 0)
    assert not iir1 & 1 and not iir2 & 1


def test_thre_not_reported_when_disabled(port):
    port.outb(MCR, OUT2)
    port.outb(THR, ord("a"))
    assert port.iid() == 0x01
    assert port.irq.level is False
    assert port.inb(LSR) & (THRE | TEMT) == THRE | TEMT


def test_rx_fifo_holds_16_and_input_waits_instead_of_overrunning(port):
    port.outb(FCR, 0x07)
    data = bytes(range(40))
    port.backend.inject(data)
    assert len(port.uart.rx) == 16
    assert port.backend.pending() == 24
    assert port.inb(LSR) & (DR | OE) == DR  # no overrun: the backend held the rest
    assert port.rx_all() == data
    assert port.inb(LSR) & DR == 0


def test_rx_fifo_overrun_in_loopback_sets_oe(port):
    port.outb(FCR, 0x01)
    port.outb(MCR, LOOP)
    for b in range(17):
        port.outb(THR, b)
    lsr = port.inb(LSR)
    assert lsr & OE and lsr & DR
    assert port.inb(LSR) & OE == 0  # OE clears when LSR is read
    assert port.rx_all() == bytes(range(16))  # the 17th character was lost


def test_non_fifo_mode_overrun_overwrites_rbr(port):
    port.outb(MCR, LOOP)
    port.outb(THR, 1)
    port.outb(THR, 2)
    assert port.inb(LSR) & OE
    assert port.rx_all() == b"\x02"


@pytest.mark.parametrize("fcr,level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_fifo_trigger_levels(port, fcr, level):
    port.outb(FCR, fcr | 0x06)
    port.outb(IER, 0x01)
    if level > 1:
        port.backend.inject(b"a" * (level - 1))
        assert port.iid() == 0x0C  # below the trigger: only the character timeout
    port.backend.inject(b"b")
    assert port.iid() == 0x04  # trigger reached: received data available
    port.inb(RBR)
    expected = 0x0C if level > 1 else 0x01
    assert port.iid() == expected  # below the trigger again; RDA gone


def test_character_timeout_cleared_when_fifo_read_empty(port):
    port.outb(FCR, 0x81)  # trigger 8, as Linux programs a 16550A
    port.outb(IER, 0x01)
    port.outb(MCR, OUT2)
    port.backend.inject(b"k")
    assert port.irq.level is True
    assert port.iid() == 0x0C
    assert port.inb(RBR) == ord("k")
    assert port.iid() == 0x01
    assert port.irq.level is False


def test_iir_priorities(port):
    port.outb(FCR, 0x41)  # FIFO, trigger 4
    port.outb(MCR, LOOP)  # loopback: DCD/DSR/CTS drop to the (clear) MCR outputs -> MSR deltas
    port.outb(IER, 0x0F)
    for b in range(17):  # 16 in the FIFO, one overrun
        port.outb(THR, b)
    assert port.inb(IIR) == 0xC6  # line status first (and FIFO bits set)
    port.inb(LSR)
    assert port.iid() == 0x04  # then received data (16 >= 4)
    for _ in range(14):
        port.inb(RBR)
    assert port.iid() == 0x0C  # 2 below the trigger: character timeout
    port.inb(RBR)
    port.inb(RBR)
    assert port.iid() == 0x02  # then THR empty -- cleared by this read
    assert port.iid() == 0x00  # then modem status
    msr = port.inb(MSR)
    assert msr & 0x0F  # the deltas that caused it, cleared by the read
    assert port.iid() == 0x01


def test_line_status_interrupt_needs_elsi(port):
    port.outb(FCR, 0x01)
    port.outb(MCR, LOOP)
    for b in range(17):
        port.outb(THR, b)
    port.outb(IER, 0x01)
    assert port.iid() == 0x04  # OE is set but ELSI is off
    port.outb(IER, 0x05)
    assert port.iid() == 0x06


def test_fcr_clears_rx_and_tx(port):
    port.outb(FCR, 0x01)
    port.backend.inject(b"hello")
    assert port.inb(LSR) & DR
    port.outb(FCR, 0x03)  # clear RX
    assert port.inb(LSR) & DR == 0
    port.outb(FCR, 0x05)  # clear TX: the transmitter stays empty
    assert port.inb(LSR) & (THRE | TEMT) == THRE | TEMT
    assert port.rx_all() == b""


def test_fifo_enable_shows_in_iir_and_toggling_resets_fifo(port):
    port.outb(FCR, 0x01)
    assert port.inb(IIR) & 0xC0 == 0xC0
    port.backend.inject(b"abc")
    port.outb(FCR, 0x00)
    assert port.inb(IIR) & 0xC0 == 0
    assert port.inb(LSR) & DR == 0


def test_fcr_bits_ignored_without_fifo_enable(port):
    port.outb(FCR, 0xC0)  # trigger bits without bit 0: not programmed, FIFO stays off
    assert port.inb(IIR) & 0xC0 == 0
    assert port.uart.trigger == 1


def test_loopback_thr_to_rbr_and_not_to_the_line(port):
    port.outb(FCR, 0x07)
    port.outb(MCR, LOOP)
    for c in b"loop":
        port.outb(THR, c)
    assert port.rx_all() == b"loop"
    assert port.backend.output == b""


@pytest.mark.parametrize(
    "mcr,msr_in",
    [(0x01, 0x20), (0x02, 0x10), (0x04, 0x40), (0x08, 0x80), (0x0F, 0xF0), (0x00, 0x00)],
)
def test_loopback_mcr_outputs_drive_msr_inputs(port, mcr, msr_in):
    port.outb(MCR, LOOP | mcr)
    assert port.inb(MSR) & 0xF0 == msr_in


def test_msr_delta_bits(port):
    port.outb(MCR, LOOP)
    port.inb(MSR)
    port.outb(MCR, LOOP | 0x0F)  # CTS, DSR, RI, DCD rise
    assert port.inb(MSR) == 0xF0 | 0x0B  # DCTS, DDSR, DDCD; TERI only on a falling RI
    assert port.inb(MSR) == 0xF0  # deltas cleared by the read
    port.outb(MCR, LOOP | 0x0B)  # RI falls
    assert port.inb(MSR) & 0x0F == 0x04


def test_modem_inputs_outside_loopback(port):
    assert port.inb(MSR) & 0xF0 == 0xB0  # DCD, DSR, CTS: a terminal is there


def test_input_waits_during_loopback(port):
    port.outb(FCR, 0x07)
    port.outb(MCR, LOOP)
    port.backend.inject(b"typed")
    assert port.rx_all() == b""  # the receiver is cut off from the line
    port.outb(MCR, 0)
    assert port.rx_all() == b"typed"


def test_irq_line_follows_interrupt_state_and_out2_gate(port):
    port.outb(FCR, 0x01)
    port.outb(IER, 0x01)
    port.backend.inject(b"z")
    assert port.iid() == 0x04
    assert port.irq.level is False  # OUT2 clear: the PC's gate holds the line low
    port.outb(MCR, OUT2)
    assert port.irq.level is True
    port.outb(MCR, OUT2 | LOOP)
    assert port.irq.level is False  # loopback disconnects OUT2 from the pin
    port.outb(MCR, OUT2)
    assert port.irq.level is True
    port.inb(RBR)
    assert port.irq.level is False
    port.outb(IER, 0)
    port.backend.inject(b"y")
    assert port.irq.level is False  # data, but the interrupt is not enabled


def test_irq_without_out2_gate():
    p = Port(pc_out2_gate=False)
    p.outb(IER, 0x02)
    assert p.irq.level is True
    p.uart.close()


def test_all_eight_bits_pass_whatever_the_frame_format(port):
    # power-on LCR is 5N1; unprogrammed early-boot code must still print
    port.outb(THR, 0xE9)
    port.outb(LCR, 0x02)
    port.outb(THR, 0xFF)
    assert port.backend.output == b"\xe9\xff"
    port.backend.inject(b"\xc3")
    assert port.inb(RBR) == 0xC3


def test_bad_offsets_and_sizes_never_raise(port):
    assert port.uart.read(8, 1) == 0xFF
    assert port.uart.read(-1, 1) == 0xFF
    assert port.uart.read(0, 0) == 0
    assert port.uart.read(0, 16) == 0
    port.uart.write(9, 1, 0x12)
    port.uart.write(0, 3, 0x123456)
    port.uart.write(0, 0, 1)
    # a 16-bit access reads two consecutive registers (SCR, then a floating port)
    port.outb(SCR, 0x42)
    assert port.uart.read(7, 2) == 0xFF42


def test_reset_restores_power_on_state(port):
    port.outb(FCR, 0xC7)
    port.outb(IER, 0x0F)
    port.outb(MCR, 0x1F)
    port.uart.reset()
    assert (port.inb(IER), port.inb(IIR), port.inb(MCR), port.inb(LCR)) == (0, 0x01, 0, 0)


def test_com_ports_table():
    assert COM_PORTS == {"com1": (0x3F8, 4), "com2": (0x2F8, 3), "com3": (0x3E8, 4), "com4": (0x2E8, 3)}


def test_concurrent_input_and_guest_reads_lose_nothing():
    p = Port()
    p.outb(FCR, 0x81)
    data = bytes(i % 251 for i in range(20000))
    got = bytearray()

    def typist():
        for i in range(0, len(data), 37):
            chunk = data[i : i + 37]
            while p.backend.pending() > 2000:  # a source that waits when the backend is full
                threading.Event().wait(0.0005)
            p.backend.inject(chunk)

    t = threading.Thread(target=typist)
    t.start()
    while len(got) < len(data):
        if p.inb(LSR) & DR:
            got.append(p.inb(RBR))
    t.join()
    assert bytes(got) == data
    assert p.inb(LSR) & OE == 0
    p.uart.close()


class PortBus:
    """A hypervisor backend with only port I/O and IRQ levels (what ``attach_uart`` uses)."""

    def __init__(self) -> None:
        self.pio: dict[int, tuple[int, object, str]] = {}
        self.levels: list[tuple[int, bool]] = []

    @vmmimpl
    def vmm_register_pio(self, port, count, handler, owner):
        self.pio[port] = (count, handler, owner)
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq, level):
        self.levels.append((irq, level))
        return True


def test_attach_uart_places_it_on_its_com_port_and_says_where():
    bus = PortBus()
    vmm = Vmm(bus, name="t")
    backend = MemoryBackend()
    try:
        uart = attach_uart(vmm, backend, "com2")
        assert (uart.name, uart.port, uart.irq_number) == ("ttyS1", 0x2F8, 3)
        assert bus.pio[0x2F8][:2] == (8, uart)
        uart.write(MCR, 1, OUT2)
        uart.write(IER, 1, 0x02)  # THR-empty interrupt on: the line the UART names is the one raised
        assert (uart.irq_number, True) in bus.levels
    finally:
        uart.close()
        vmm.close()
