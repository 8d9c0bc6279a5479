"""virtio-console (virtio 1.2, section 5.3): the guest's hvc0, plus named ports (virtserialport).

Queues: port 0 receives on queue 0 and transmits on queue 1. With MULTIPORT the control receive
queue (device -> driver) is 2, control transmit (driver -> device) is 3, and port *n* >= 1 uses
queues ``2 + 2n`` (receive) and ``3 + 2n`` (transmit).

The control conversation (MULTIPORT)::

    driver: DEVICE_READY(1)          device: PORT_ADD(id) for every port
    driver: PORT_READY(id, 1)        device: CONSOLE_PORT(0, 1)   (port 0 only) + RESIZE(0)
                                             PORT_NAME(id) + name (named ports)
                                             PORT_OPEN(id, 1)     (the host side is there)
    driver: PORT_OPEN(id, 1|0)       the guest opened / closed the port
    device: RESIZE(0) + (cols, rows) the host terminal changed size (SIGWINCH)

Input is delivered to a port only while the guest has it open (Linux discards data that arrives
for a closed port); until then, and while the guest posts no receive buffers, it waits in the
backend, whose input is bounded and flow-controlled -- nothing is lost. Without MULTIPORT port 0
is always open.

SIZE: the configuration space carries the host terminal's cols/rows (offered when the console
backend is a terminal), and a size change raises a configuration interrupt. EMERG_WRITE: a byte
the driver writes to ``emerg_wr`` goes straight to port 0's backend.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from typing import Optional, Sequence

from vdm.device import VirtioDevice
from vdm.sg import slice_views
from vdm.virtqueue import Virtqueue

from .backends.base import ConsoleBackend

__all__ = ["ConsolePort", "VirtioConsole"]

log = logging.getLogger(__name__)

# feature bits
F_SIZE = 0
F_MULTIPORT = 1
F_EMERG_WRITE = 2

# control events
DEVICE_READY = 0
PORT_ADD = 1
PORT_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

CONTROL = struct.Struct("<IHH")  # id, event, value
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
EMERG_WR_OFFSET = 8

RX_CONTROL = 2
TX_CONTROL = 3
#: the most control messages kept for a driver that posts no control buffers
MAX_PENDING_CONTROL = 1024
#: guest output is handed to the backend in pieces of at most this size
TX_PIECE = 64 * 1024


def rx_queue(port_id: int) -> int:
    return 0 if port_id == 0 else 2 + 2 * port_id


def port_of_queue(index: int) -> int:
    return 0 if index < 2 else index // 2 - 1


class ConsolePort:
    """One port: its backend and what each side said about it."""

    def __init__(self, port_id: int, backend: ConsoleBackend, name: Optional[str] = None,
                 console: bool = False) -> None:
        self.id = port_id
        self.backend = backend
        self.name = name
        self.console = console
        #: the driver sent PORT_READY(1)
        self.ready = False
        #: the guest has the port open (PORT_OPEN from the driver; always, without MULTIPORT)
        self.guest_open = False


class VirtioConsole(VirtioDevice):
    """virtio-console with port 0 as the console and optional named extra ports."""

    device_id = 3
    name = "virtio-console"
    guest_console = "hvc0"  # port 0 is the guest's console

    def __init__(
        self,
        backend: ConsoleBackend,
        extra_ports: Sequence[tuple[str, ConsoleBackend]] = (),
        *,
        multiport: bool = True,
        emerg_write: bool = True,
        legacy_resize: bool = False,
        queue_size: int = 128,
    ) -> None:
        if extra_ports and not multiport:
            raise ValueError("extra ports need MULTIPORT")
        self.ports = [ConsolePort(0, backend, console=True)]
        self.ports += [ConsolePort(i + 1, b, name=n) for i, (n, b) in enumerate(extra_ports)]
        self.multiport = multiport
        self.emerg_write = emerg_write
        self.legacy_resize = legacy_resize
        nqueues = 2 + 2 * len(self.ports) if multiport else 2
        self.queue_max_sizes = (queue_size,) * nqueues
        super().__init__()
        size = backend.window_size()
        self.offer_size = size is not None
        self.rows, self.cols = size if size is not None else (0, 0)
        self._control: collections.deque[bytes] = collections.deque()
        self._control_lock = threading.Lock()
        backend.add_resize_listener(self._on_resize)
        for port in self.ports:
            port.backend.start(lambda p=port: self._on_input(p))

    # ---- features and configuration ----------------------------------------------------------

    def device_features(self) -> int:
        f = 0
        if self.offer_size:
            f |= 1 << F_SIZE
        if self.multiport:
            f |= 1 << F_MULTIPORT
        if self.emerg_write:
            f |= 1 << F_EMERG_WRITE
        return f

    @property
    def multiport_active(self) -> bool:
        return self.multiport and self.has_feature(F_MULTIPORT)

    def config_space(self) -> bytes:
        return CONFIG.pack(self.cols, self.rows, len(self.ports), 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # emerg_wr: the driver writes one character (as a 32-bit value) for immediate output
        if self.emerg_write and offset == EMERG_WR_OFFSET and data:
            self.ports[0].backend.write(bytes(data[:1]))

    # ---- life cycle ------------------------------------------------------------------------------

    def on_activate(self) -> None:
        if not self.multiport_active:
            self.ports[0].guest_open = True  # a single-port console is always connected

    def on_reset(self) -> None:
        for port in self.ports:
            port.ready = False
            port.guest_open = False
        with self._control_lock:
            self._control.clear()

    def close(self) -> None:
        """Reset and stop every port's backend."""
        self.reset()
        for port in self.ports:
            port.backend.close()

    # ---- queues ---------------------------------------------------------------------------------

    def process_queue(self, queue: Virtqueue) -> None:
        index = queue.index
        if index == RX_CONTROL:
            self._flush_control(queue)
        elif index == TX_CONTROL:
            self._handle_control(queue)
        elif index < 2 or self.multiport_active:
            port = self.ports[port_of_queue(index)]
            if index % 2 == 0:
                self._receive(port, queue)
            else:
                self._transmit(port, queue)
        # queues beyond 1 without MULTIPORT carry nothing; buffers there are left alone

    def _transmit(self, port: ConsolePort, queue: Virtqueue) -> None:
        used = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            for piece in slice_views(chain.readable, 0, None):
                for off in range(0, len(piece), TX_PIECE):
                    port.backend.write(bytes(piece[off : off + TX_PIECE]))
            queue.push(chain, 0)
            used = True
        if used:
            self.signal_used(queue)

    def _receive(self, port: ConsolePort, queue: Virtqueue) -> None:
        if not port.guest_open:
            return  # input waits in the backend until the guest opens the port
        backend = port.backend
        used = False
        while backend.pending():
            chain = queue.pop()
            if chain is None:
                break  # no buffers: input waits, the driver's next kick brings us back
            data = backend.read(chain.writable_len)
            queue.push(chain, chain.write(data))
            used = True
        if used:
            self.signal_used(queue)

    def _on_input(self, port: ConsolePort) -> None:
        self.kick(rx_queue(port.id))

    # ---- control queues ------------------------------------------------------------------------

    def _send_control(self, port_id: int, event: int, value: int = 1, payload: bytes = b"") -> None:
        msg = CONTROL.pack(port_id, event, value) + payload
        with self._control_lock:
            if event == RESIZE:  # only the newest size matters
                self._control = collections.deque(
                    m for m in self._control if CONTROL.unpack_from(m)[:2] != (port_id, RESIZE)
                )
            if len(self._control) >= MAX_PENDING_CONTROL:
                log.warning("%s: driver takes no control messages; dropping event %d", self.name, event)
                return
            self._control.append(msg)
        self.kick(RX_CONTROL)

    def _flush_control(self, queue: Virtqueue) -> None:
        used = False
        while True:
            with self._control_lock:
                if not self._control:
                    break
                chain = queue.pop()
                if chain is None:
                    break
                msg = self._control.popleft()
            queue.push(chain, chain.write(msg))  # a name longer than the buffer is cut short
            used = True
        if used:
            self.signal_used(queue)

    def _handle_control(self, queue: Virtqueue) -> None:
        used = False
        while True:
            chain = queue.pop()
            if chain is None:
                break
            msg = chain.read(0, CONTROL.size)
            queue.push(chain, 0)
            used = True
            if len(msg) < CONTROL.size:
                log.warning("%s: short control message (%d bytes) ignored", self.name, len(msg))
                continue
            self._control_event(*CONTROL.unpack(msg))
        if used:
            self.signal_used(queue)

    def _control_event(self, port_id: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if not value:
                log.warning("%s: the driver failed to set up the device", self.name)
                return
            for port in self.ports:
                self._send_control(port.id, PORT_ADD, 1)
            return
        if not 0 <= port_id < len(self.ports):
            log.warning("%s: control event %d for unknown port %d ignored", self.name, event, port_id)
            return
        port = self.ports[port_id]
        if event == PORT_READY:
            if not value:
                log.warning("%s: the driver failed to add port %d", self.name, port_id)
                return
            port.ready = True
            if port.console:
                self._send_control(port_id, CONSOLE_PORT, 1)
                if self.rows and self.cols:
                    self._send_control(port_id, RESIZE, 0, self._resize_payload())
            if port.name:
                self._send_control(port_id, PORT_NAME, 1, port.name.encode() + b"\0")
            self._send_control(port_id, PORT_OPEN, 1)  # the host side is always there
        elif event == PORT_OPEN:
            port.guest_open = bool(value)
            if port.guest_open:
                self.kick(rx_queue(port_id))  # deliver what waited
        else:
            log.debug("%s: control event %d from the driver ignored", self.name, event)

    # ---- terminal size -----------------------------------------------------------------------

    def _resize_payload(self) -> bytes:
        if self.legacy_resize:
            return struct.pack("<HH", self.rows, self.cols)
        return struct.pack("<HH", self.cols, self.rows)

    def _on_resize(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows & 0xFFFF, cols & 0xFFFF
        if not self.activated:
            return
        if self.multiport_active:
            if self.ports[0].ready:
                self._send_control(0, RESIZE, 0, self._resize_payload())
        elif self.has_feature(F_SIZE):
            self.signal_config()
