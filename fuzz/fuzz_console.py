#!/usr/bin/env python3
"""Fuzz target: vdm_console -- virtio-console control messages and queues, and the 16550 UART.

virtio-console: the input is a series of control messages from the driver (any port id, event and
value, also short ones), console output on the ports' transmit queues, receive buffers of any size
on the control receive queue and on port 0, and typed input. Invariants: every transmitted chain
comes back with nothing written and its bytes reach that port's backend in order; control
messages to the driver are whole 8-byte headers (cut only by a too-small buffer) written inside
their buffers; the queue of control messages waiting for the driver stays bounded; nothing outside
guest RAM changes; the device is never marked broken by well-formed chains.

16550 UART: the input is a series of register reads and writes (any offset, width and value) and
typed input. Invariants: no access raises; the interrupt line is only driven on a change and always
matches the UART's own level; bytes reaching the backend are at most the bytes written to THR.
"""

from __future__ import annotations

import struct
import sys

import common

CONTROL = struct.Struct("<IHH")


def fuzz_virtio(fdp) -> None:
    from vdm.testing import VirtioTestDriver
    from vdm_console.backends import MemoryBackend
    from vdm_console.virtio import MAX_PENDING_CONTROL, VirtioConsole

    b0, b1 = MemoryBackend(), MemoryBackend()
    if fdp.ConsumeBool():
        b0.size = (fdp.ConsumeIntInRange(0, 0xFFFF), fdp.ConsumeIntInRange(0, 0xFFFF))
    dev = VirtioConsole(b0, [("org.example.fuzz", b1)], legacy_resize=fdp.ConsumeBool(), queue_size=32)
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    try:
        drv.init(exclude=fdp.ConsumeIntInRange(0, 7))
        multiport = bool(drv.features & 2)
        expect = {0: bytearray(), 1: bytearray()}
        ctrl_rx_posted = 0
        for _ in range(fdp.ConsumeIntInRange(1, 16)):
            op = fdp.ConsumeIntInRange(0, 4)
            if op == 0 and multiport:  # a control message from the driver
                wide = fdp.ConsumeBool()
                port = fdp.ConsumeIntInRange(0, (1 << 32) - 1) if wide else fdp.ConsumeIntInRange(0, 3)
                event = fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFF)
                msg = CONTROL.pack(port, event, fdp.ConsumeIntInRange(0, 0xFFFF)) + fdp.ConsumeBytes(
                    fdp.ConsumeIntInRange(0, 16)
                )
                msg = msg[: fdp.ConsumeIntInRange(1, len(msg))]
                used = drv.request(3, [msg], [], timeout=5)
                assert used.written == 0
            elif op == 1 and multiport:  # a buffer for control messages to the driver
                if ctrl_rx_posted < 16:
                    drv.post(2, [], [fdp.ConsumeIntInRange(1, 64)])
                    drv.kick(2)
                    ctrl_rx_posted += 1
            elif op == 2:  # console output
                port = fdp.ConsumeIntInRange(0, 1) if multiport else 0
                data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)) or b"x"
                pieces = fdp.ConsumeIntInRange(1, 4)
                step = max(1, len(data) // pieces)
                pieces_ = [data[i : i + step] for i in range(0, len(data), step)]
                used = drv.request(1 if port == 0 else 5, pieces_)
                assert used.written == 0
                expect[port] += data
            elif op == 3:  # typed input, and a buffer on port 0 for it
                b0.inject(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)))
                n = fdp.ConsumeIntInRange(1, 200)
                drv.post(0, [], [n])
                drv.kick(0)
            else:
                if multiport:
                    dev.kick(2)
            for u in drv.collect(2):  # control messages the device sent
                assert 0 < u.written <= len(u.data), u
                if u.written >= CONTROL.size:
                    port_id, event, _ = CONTROL.unpack_from(u.data)
                    assert port_id in (0, 1) and 0 <= event <= 7, (port_id, event)
                ctrl_rx_posted -= 1
            for u in drv.collect(0):
                assert u.written <= len(u.data)
            assert len(dev._control) <= MAX_PENDING_CONTROL
        assert bytes(b0.output) == bytes(expect[0]), "port 0 output differs from what the guest sent"
        assert bytes(b1.output) == bytes(expect[1]), "port 1 output differs from what the guest sent"
        assert not drv.needs_reset and dev.broken is None
    finally:
        dev.close()
        drv.ram.check_guards()


class Irq:
    def __init__(self) -> None:
        self.level = False
        self.changes = 0

    def set_level(self, level: bool) -> None:
        assert level != self.level, "interrupt line driven to the level it already had"
        self.level = level
        self.changes += 1

    def trigger(self) -> None:
        self.set_level(True)
        self.set_level(False)


def fuzz_uart(fdp) -> None:
    from vdm_console.backends import MemoryBackend
    from vdm_console.uart import Uart16550

    backend = MemoryBackend(input_buffer=256)
    irq = Irq()
    uart = Uart16550(irq, backend, pc_out2_gate=fdp.ConsumeBool())
    thr_bytes = 0
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 64)):
            op = fdp.ConsumeIntInRange(0, 6)
            offset = fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-2, 12)
            size = (1, 1, 1, 2, 4, 8, fdp.ConsumeIntInRange(0, 10))[fdp.ConsumeIntInRange(0, 6)]
            if op < 3:
                uart.read(offset, size)
            elif op < 6:
                uart.write(offset, size, fdp.ConsumeIntInRange(0, (1 << 64) - 1))
                if 1 <= size <= 8 and offset <= 0 < offset + size:
                    thr_bytes += 1
            else:  # typed input; a real source is flow-controlled: it delivers only into free room
                room = max(0, backend.capacity - backend.pending())
                backend.inject(fdp.ConsumeBytes(min(room, fdp.ConsumeIntInRange(0, 64))))
            assert irq.level == uart.irq_level, "the line and the UART disagree"
            assert len(backend.output) <= thr_bytes, "output the guest never wrote"
        if fdp.ConsumeBool():
            uart.reset()
            assert irq.level == uart.irq_level
    finally:
        uart.close()


def one_input(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    opened = common.watch_files()
    opened.clear()
    if fdp.ConsumeBool():
        fuzz_uart(fdp)
    else:
        fuzz_virtio(fdp)
    assert not common.data_files(opened), f"files opened while serving the guest: {opened}"


if __name__ == "__main__":
    common.run(
        one_input,
        (
            "vdm_console.virtio",
            "vdm_console.uart",
            "vdm_console.backends.base",
            *common.QUEUE_MODULES,
        ),
    )
    sys.exit(0)
