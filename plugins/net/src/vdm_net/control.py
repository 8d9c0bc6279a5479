"""virtio-net's control queue (virtio 1.2, 5.1.6.5): command parsing, checks and the device state
the commands set.

Each command is ``class, command, body..., ack``: the driver-readable part is parsed here, the
one-byte ack (:data:`CTRL_OK` / :data:`CTRL_ERR`) written into the last writable byte. A command
the negotiated features do not allow, an unknown class or command, or a body of the wrong length
is answered :data:`CTRL_ERR` and changes nothing; a chain with no writable byte is counted as
``ctrl_malformed`` and returned with nothing written.

rx-mode, MAC-table and VLAN-filter commands are remembered (:attr:`ControlQueue.rx_mode`,
:attr:`~ControlQueue.mac_table`, :attr:`~ControlQueue.vlans`) and answered OK but filter nothing
(the tap hands over every frame). MAC_ADDR_SET, VQ_PAIRS_SET and GUEST_OFFLOADS_SET act on the
device through :class:`NetControlTarget` (:class:`vdm_net.device.VirtioNet` implements it).
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from typing import Callable, Protocol

from vdm.virtqueue import DescriptorChain, Virtqueue

from . import features as nf

__all__ = ["CTRL_ERR", "CTRL_OK", "MAX_CTRL_LEN", "ControlQueue", "NetControlTarget"]

log = logging.getLogger(__name__)

CTRL_OK = 0
CTRL_ERR = 1
CLASS_RX = 0
CLASS_MAC = 1
CLASS_VLAN = 2
CLASS_ANNOUNCE = 3
CLASS_MQ = 4
CLASS_GUEST_OFFLOADS = 5
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
MAC_TABLE_SET = 0
MAC_ADDR_SET = 1
VLAN_ADD = 0
VLAN_DEL = 1
MQ_VQ_PAIRS_SET = 0
GUEST_OFFLOADS_SET = 0
#: the largest command accepted (a MAC table of a few thousand entries)
MAX_CTRL_LEN = 64 * 1024


class NetControlTarget(Protocol):
    """What the control queue needs from its device."""

    name: str

    @property
    def driver_features(self) -> int: ...

    @property
    def queue_pairs(self) -> int:
        """How many queue pairs the device has (VQ_PAIRS_SET may enable 1 to this many)."""
        ...

    def has_feature(self, bit: int) -> bool: ...

    def set_mac(self, mac: bytes) -> None:
        """MAC_ADDR_SET: the MAC in the config space until the next reset."""

    def set_active_pairs(self, n: int) -> None:
        """VQ_PAIRS_SET: use queue pairs 0..n-1 (may raise OSError: answered CTRL_ERR)."""

    def set_guest_offloads(self, offloads: int) -> None:
        """GUEST_OFFLOADS_SET: the receive offloads the driver takes now (may raise OSError)."""

    def signal_used(self, queue: Virtqueue) -> None: ...


class ControlQueue:
    """The control queue's commands and the filter state they set (cleared by :meth:`reset`).

    :meth:`process` runs only from the device's serialized processing of the control queue, so
    the state needs no lock of its own; :attr:`stats` counts ``ctrl_ok``, ``ctrl_err`` and
    ``ctrl_malformed``.
    """

    def __init__(self, device: NetControlTarget) -> None:
        self._dev = device
        #: RX_* command -> on/off, as last set by the driver
        self.rx_mode: dict[int, bool] = {}
        #: (unicast, multicast) MAC tables from MAC_TABLE_SET
        self.mac_table: tuple[list[bytes], list[bytes]] = ([], [])
        #: VLAN ids added and not deleted
        self.vlans: set[int] = set()
        self.stats: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget the filters (the driver sets them again after it activates the device)."""
        self.rx_mode = {}
        self.mac_table = ([], [])
        self.vlans = set()

    def process(self, q: Virtqueue) -> None:
        """Answer every command waiting on ``q`` and signal the driver once."""
        done = False
        while (chain := q.pop()) is not None:
            ack = self.command(chain)
            self.stats["ctrl_ok" if ack == CTRL_OK else "ctrl_err"] += 1
            if chain.writable_len >= 1:
                chain.write(bytes([ack]), chain.writable_len - 1)
                q.push(chain, 1)
            else:
                self.stats["ctrl_malformed"] += 1
                q.push(chain, 0)
            done = True
        if done:
            self._dev.signal_used(q)

    def command(self, chain: DescriptorChain) -> int:
        """Parse and carry out one command; the ack to write."""
        length = chain.readable_len
        if length < 2 or length > MAX_CTRL_LEN:
            return CTRL_ERR
        data = chain.read(0, length)
        cls, cmd, body = data[0], data[1], data[2:]
        handler: Callable[[int, bytes], int] | None = {
            CLASS_RX: self._rx,
            CLASS_MAC: self._mac,
            CLASS_VLAN: self._vlan,
            CLASS_MQ: self._mq,
            CLASS_GUEST_OFFLOADS: self._guest_offloads,
        }.get(cls)
        if handler is None:
            return CTRL_ERR
        try:
            return handler(cmd, body)
        except OSError as e:
            log.warning("%s: control command %d/%d failed: %s", self._dev.name, cls, cmd, e)
            return CTRL_ERR

    def _rx(self, cmd: int, body: bytes) -> int:
        # the tap delivers every frame anyway; the modes are remembered and answered OK
        needed = nf.F_CTRL_RX if cmd in (RX_PROMISC, RX_ALLMULTI) else nf.F_CTRL_RX_EXTRA
        if cmd > RX_NOBCAST or not self._dev.has_feature(needed) or len(body) != 1:
            return CTRL_ERR
        self.rx_mode[cmd] = bool(body[0])
        return CTRL_OK

    def _mac(self, cmd: int, body: bytes) -> int:
        dev = self._dev
        if cmd == MAC_ADDR_SET:
            if not dev.has_feature(nf.F_CTRL_MAC_ADDR) or len(body) != 6:
                return CTRL_ERR
            dev.set_mac(bytes(body))
            return CTRL_OK
        if cmd != MAC_TABLE_SET or not dev.has_feature(nf.F_CTRL_RX):
            return CTRL_ERR
        tables: list[list[bytes]] = []
        off = 0
        for _ in range(2):
            if off + 4 > len(body):
                return CTRL_ERR
            (entries,) = struct.unpack_from("<I", body, off)
            off += 4
            if entries > (len(body) - off) // 6:
                return CTRL_ERR
            tables.append([bytes(body[off + 6 * i : off + 6 * i + 6]) for i in range(entries)])
            off += 6 * entries
        if off != len(body):
            return CTRL_ERR
        self.mac_table = (tables[0], tables[1])
        return CTRL_OK

    def _vlan(self, cmd: int, body: bytes) -> int:
        if not self._dev.has_feature(nf.F_CTRL_VLAN) or cmd not in (VLAN_ADD, VLAN_DEL) or len(body) != 2:
            return CTRL_ERR
        (vid,) = struct.unpack("<H", body)
        if vid >= 4096:
            return CTRL_ERR
        if cmd == VLAN_ADD:
            self.vlans.add(vid)
        else:
            self.vlans.discard(vid)
        return CTRL_OK

    def _mq(self, cmd: int, body: bytes) -> int:
        dev = self._dev
        if not dev.has_feature(nf.F_MQ) or cmd != MQ_VQ_PAIRS_SET or len(body) != 2:
            return CTRL_ERR
        (n,) = struct.unpack("<H", body)
        if not 1 <= n <= dev.queue_pairs:
            return CTRL_ERR
        dev.set_active_pairs(n)
        log.info("%s: driver uses %d of %d queue pairs", dev.name, n, dev.queue_pairs)
        return CTRL_OK

    def _guest_offloads(self, cmd: int, body: bytes) -> int:
        dev = self._dev
        if not dev.has_feature(nf.F_CTRL_GUEST_OFFLOADS) or cmd != GUEST_OFFLOADS_SET or len(body) != 8:
            return CTRL_ERR
        (offloads,) = struct.unpack("<Q", body)
        if offloads & ~(dev.driver_features & nf.GUEST_OFFLOAD_MASK):
            return CTRL_ERR
        if nf.dependency_violation(offloads) is not None:
            return CTRL_ERR
        dev.set_guest_offloads(offloads)
        return CTRL_OK
