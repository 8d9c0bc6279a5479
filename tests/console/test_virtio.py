"""virtio-console through vdm.testing's in-process driver: output, input, multiport control, resize."""

from __future__ import annotations

import struct
import time

import pytest
from vdm.transport.mmio import Reg
from vdm_console.backends import MemoryBackend
from vdm_console.virtio import (
    CONSOLE_PORT,
    DEVICE_READY,
    F_EMERG_WRITE,
    F_MULTIPORT,
    F_SIZE,
    PORT_ADD,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    RESIZE,
    VirtioConsole,
)

CTRL = struct.Struct("<IHH")


def sized_backend(rows=24, cols=80) -> MemoryBackend:
    b = MemoryBackend()
    b.size = (rows, cols)
    return b


@pytest.fixture
def single(virtio_driver):
    """A console whose driver did not take MULTIPORT (Linux's hvc0 with one port)."""
    backend = sized_backend()
    dev = VirtioConsole(backend)
    drv = virtio_driver(dev)
    drv.init(exclude=1 << F_MULTIPORT, queues=[0, 1])
    yield drv, backend
    dev.close()


def test_features_and_config_space(virtio_driver):
    dev = VirtioConsole(sized_backend(30, 120), [("org.example.port", MemoryBackend())])
    drv = virtio_driver(dev)
    offered = drv.device_features()
    assert offered & (1 << F_SIZE | 1 << F_MULTIPORT | 1 << F_EMERG_WRITE) == (
        1 << F_SIZE | 1 << F_MULTIPORT | 1 << F_EMERG_WRITE
    )
    drv.init()
    cols, rows, max_ports = struct.unpack("<HHI", drv.config_bytes(0, 8))
    assert (cols, rows, max_ports) == (120, 30, 2)
    assert len(dev.queues) == 6  # port 0 rx/tx, control rx/tx, port 1 rx/tx
    dev.close()


def test_no_size_feature_when_backend_is_not_a_terminal(virtio_driver):
    dev = VirtioConsole(MemoryBackend())
    drv = virtio_driver(dev)
    assert not drv.device_features() >> F_SIZE & 1
    dev.close()


def test_output(single):
    drv, backend = single
    drv.request(1, out=[b"Linux version ", b"6.x\n"])
    assert backend.output == b"Linux version 6.x\n"
    big = bytes(range(256)) * 1024
    drv.request(1, out=[big[:100000], big[100000:]])
    assert bytes(backend.output[18:]) == big


def test_input_into_posted_buffers(single):
    drv, backend = single
    head = drv.submit(0, in_lens=[64])
    backend.inject(b"root\r")
    (used,) = drv.wait(0, 1)
    assert used.head == head and used.written == 5
    assert used.data[:5] == b"root\r"


def test_input_waits_for_buffers_and_is_never_lost(single):
    drv, backend = single
    typed = bytes(range(256)) + b"tail"
    backend.inject(typed)  # no buffers posted yet: it all waits in the backend
    time.sleep(0.05)
    assert backend.pending() == len(typed)
    for _ in range(4):
        drv.post(0, in_lens=[64])
    drv.kick(0)
    got = b"".join(u.data[: u.written] for u in drv.wait(0, 4))
    assert got == typed[:256]
    assert backend.pending() == 4
    drv.submit(0, in_lens=[64])
    (used,) = drv.wait(0, 1)
    assert got + used.data[: used.written] == typed


def test_emergency_write(single):
    drv, backend = single
    drv.config_write(8, ord("!"), 4)
    assert backend.output == b"!"


def test_resize_without_multiport_raises_config_interrupt(single):
    drv, backend = single
    drv.ack_interrupts()
    gen = drv.reg_read(Reg.CONFIG_GENERATION)
    backend.resize(50, 132)
    assert drv.ack_interrupts() & 2  # configuration change
    assert drv.reg_read(Reg.CONFIG_GENERATION) != gen
    assert struct.unpack("<HH", drv.config_bytes(0, 4)) == (132, 50)


# ---- multiport ---------------------------------------------------------------------------------


class Control:
    """The driver's side of the control queues."""

    def __init__(self, drv) -> None:
        self.drv = drv
        for _ in range(16):
            drv.post(2, in_lens=[128])
        drv.kick(2)

    def send(self, port: int, event: int, value: int = 1) -> None:
        self.drv.request(3, out=[CTRL.pack(port, event, value)])

    def receive(self, count: int) -> list[tuple[int, int, int, bytes]]:
        out = []
        for u in self.drv.wait(2, count):
            port, event, value = CTRL.unpack_from(u.data)
            out.append((port, event, value, u.data[CTRL.size : u.written]))
            self.drv.post(2, in_lens=[128])  # keep the queue stocked, as Linux does
        self.drv.kick(2)
        return out

    def nothing_more(self) -> bool:
        time.sleep(0.05)
        return not self.drv.collect(2)


@pytest.fixture
def multi(virtio_driver):
    console, agent = sized_backend(), MemoryBackend()
    dev = VirtioConsole(console, [("org.qemu.guest_agent.0", agent)])
    drv = virtio_driver(dev)
    drv.init()
    assert drv.features >> F_MULTIPORT & 1
    yield drv, Control(drv), console, agent
    dev.close()


def test_multiport_control_conversation(multi):
    _drv, ctl, _console, _agent = multi
    ctl.send(0xFFFFFFFF, DEVICE_READY, 1)
    assert ctl.receive(2) == [(0, PORT_ADD, 1, b""), (1, PORT_ADD, 1, b"")]
    ctl.send(0, PORT_READY, 1)
    msgs = ctl.receive(3)
    assert msgs[0] == (0, CONSOLE_PORT, 1, b"")
    assert msgs[1] == (0, RESIZE, 0, struct.pack("<HH", 80, 24))  # cols, rows as the spec orders
    assert msgs[2] == (0, PORT_OPEN, 1, b"")
    ctl.send(1, PORT_READY, 1)
    assert ctl.receive(2) == [(1, PORT_NAME, 1, b"org.qemu.guest_agent.0\0"), (1, PORT_OPEN, 1, b"")]
    assert ctl.nothing_more()


def test_multiport_input_waits_until_guest_opens_port(multi):
    drv, ctl, console, agent = multi
    ctl.send(0, DEVICE_READY, 1)
    ctl.send(1, PORT_READY, 1)
    ctl.receive(4)
    drv.submit(4, in_lens=[64])
    agent.inject(b'{"execute":"guest-ping"}')
    time.sleep(0.05)
    assert not drv.collect(4)  # Linux would drop data for a closed port: hold it
    ctl.send(1, PORT_OPEN, 1)
    (used,) = drv.wait(4, 1)
    assert used.data[: used.written] == b'{"execute":"guest-ping"}'
    drv.request(5, out=[b'{"return":{}}'])
    assert agent.output == b'{"return":{}}'
    assert console.output == b""  # ports are separate
    ctl.send(1, PORT_OPEN, 0)
    drv.submit(4, in_lens=[64])
    agent.inject(b"later")
    time.sleep(0.05)
    assert not drv.collect(4)
    ctl.send(1, PORT_OPEN, 1)
    assert drv.wait(4, 1)[0].data[:5] == b"later"


def test_multiport_console_output_and_input(multi):
    drv, ctl, console, _agent = multi
    ctl.send(0, DEVICE_READY, 1)
    ctl.send(0, PORT_READY, 1)
    ctl.receive(5)
    ctl.send(0, PORT_OPEN, 1)
    drv.request(1, out=[b"login: "])
    assert console.output == b"login: "
    drv.submit(0, in_lens=[32])
    console.inject(b"root\n")
    assert drv.wait(0, 1)[0].data[:5] == b"root\n"


def test_multiport_resize_message(multi):
    drv, ctl, console, _ = multi
    ctl.send(0, DEVICE_READY, 1)
    ctl.send(0, PORT_READY, 1)
    ctl.receive(5)
    console.resize(40, 100)
    assert ctl.receive(1) == [(0, RESIZE, 0, struct.pack("<HH", 100, 40))]
    assert struct.unpack("<HH", drv.config_bytes(0, 4)) == (100, 40)


def test_legacy_resize_order(virtio_driver):
    console = sized_backend(24, 80)
    dev = VirtioConsole(console, legacy_resize=True)
    drv = virtio_driver(dev)
    drv.init()
    ctl = Control(drv)
    ctl.send(0, DEVICE_READY, 1)
    ctl.send(0, PORT_READY, 1)
    msgs = ctl.receive(4)
    assert (0, RESIZE, 0, struct.pack("<HH", 24, 80)) in msgs
    dev.close()


def test_hostile_control_messages_are_ignored(multi):
    drv, ctl, _console, _agent = multi
    drv.request(3, out=[b"\x00\x00"])  # short
    ctl.send(99, PORT_READY, 1)  # no such port
    ctl.send(0, 0x7777, 1)  # unknown event
    ctl.send(1, PORT_OPEN, 1)
    assert not drv.needs_reset
    assert ctl.nothing_more()
    # a flood of DEVICE_READY with no control buffers left is bounded
    for _ in range(20):
        ctl.send(0, DEVICE_READY, 1)
    assert not drv.needs_reset
    assert len(drv.device._control) <= 1024


def test_reset_keeps_waiting_input_for_the_next_driver(single, virtio_driver):
    drv, backend = single
    drv.reg_write(Reg.STATUS, 0)
    backend.inject(b"after reset")
    drv.init(exclude=1 << F_MULTIPORT, queues=[0, 1])
    drv.submit(0, in_lens=[64])
    (used,) = drv.wait(0, 1)
    assert used.data[: used.written] == b"after reset"
