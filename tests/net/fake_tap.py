"""A stand-in for :class:`vdm_net.backends.tap.Tap` over socketpairs, for tests that need back-pressure.

A SOCK_SEQPACKET socketpair keeps message boundaries like a tap fd and, unlike a tap, pushes
back (EAGAIN) when its peer does not read. The ``fake`` fixture (tests/net/conftest.py) builds a
:class:`vdm_net.device.VirtioNet` on one and brings it up with vdm.testing's driver.
"""

from __future__ import annotations

import os
import socket

from vdm_net.backends import tun


class FakeTap:
    """What VirtioNet uses of a Tap, over socketpairs; ``peers[i]`` is the far end of queue i."""

    def __init__(self, queues: int = 1) -> None:
        self.name = "fake0"
        self.multi_queue = queues > 1
        self.accepted_offloads = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6
        self.offload = 0
        self.enabled: dict[int, bool] = {}
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(queues)]
        self._ends = [a for a, _ in pairs]
        self.peers = [p for _, p in pairs]
        for a in self._ends:
            a.setblocking(False)
        for p in self.peers:
            p.settimeout(2)
        self.fds = [a.fileno() for a in self._ends]

    def set_offload(self, flags: int) -> None:
        self.offload = flags

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        self.enabled[index] = enabled

    def fill(self, index: int) -> int:
        """Write into queue ``index`` until it pushes back; returns how many messages went in."""
        n = 0
        while n < 100_000:
            try:
                os.write(self.fds[index], b"\0" * 4096)
            except BlockingIOError:
                return n
            n += 1
        raise AssertionError("the socket never pushed back")

    def shrink(self, index: int, size: int = 4096) -> None:
        """Make queue ``index`` push back after a few frames (a small send buffer)."""
        self._ends[index].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def drain(self, index: int) -> list[bytes]:
        out = []
        self.peers[index].setblocking(False)
        try:
            while True:
                out.append(self.peers[index].recv(1 << 17))
        except BlockingIOError:
            pass
        finally:
            self.peers[index].settimeout(2)
        return out

    def close(self) -> None:
        for s in self._ends + self.peers:
            s.close()
