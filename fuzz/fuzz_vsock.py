#!/usr/bin/env python3
"""Fuzz target: vdm_vsock -- virtio-vsock from a hostile guest, with real host Unix sockets.

The device serves a tmp folder: a host listener the target owns at ``PATH_80`` (port 81 has
none), and host programs the target connects to ``PATH`` with ``CONNECT`` lines or garbage. The
input is a series of steps: tx packets with any header (op, ports, cids, type, len that matches
its payload or not, flags, credit fields) split or whole, packets shorter than a header, rx
buffers of any length (shorter than a header too), host-side accepts, reads, writes and closes,
host programs connecting, hand-made descriptors, driver resets. The device's socket thread runs
meanwhile, as under a VMM. Invariants: without hand-made descriptors the device is never failed
(nothing a guest sends breaks it); at most ``max_conns`` connections; no connection buffers more
than ``buf_size`` guest bytes, and everything the host holds stays within ``max_conns * buf_size``
plus the control queue's cap; every rx packet is a whole header addressed to the guest's cid
with a known op, its ``len`` the payload returned, no RW payload past MAX_PAYLOAD; nothing
outside guest RAM is written; after close the socket thread has ended and no fd is left.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading

import common

TMP = tempfile.mkdtemp(prefix="fuzz-vsock-")
CID = 3


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import VirtioTestDriver
    from vdm_vsock.config import VsockConfig
    from vdm_vsock.device import MAX_CTRL, VsockDevice, listen_on
    from vdm_vsock.packet import HDR, MAX_PAYLOAD, Hdr

    fdp = atheris.FuzzedDataProvider(data)
    path = os.path.join(TMP, "v.sock")
    for p in (path, path + "_80"):
        if os.path.exists(p):
            os.unlink(p)
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    max_conns, buf_size = fdp.ConsumeIntInRange(1, 6), fdp.ConsumeIntInRange(4096, 16384)
    dev = VsockDevice(VsockConfig(cid=CID, path=path, buf_size=buf_size, max_conns=max_conns, queue_size=16),
                      listener=listen_on(path))
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + "_80")
    srv.listen(16)
    srv.setblocking(False)
    host: list[socket.socket] = []
    hand_made = False
    try:
        drv.init(exclude=fdp.ConsumeIntInRange(0, 3) << 28)
        for _ in range(fdp.ConsumeIntInRange(1, 32)):
            step = fdp.ConsumeIntInRange(0, 8)
            if step <= 2:  # a tx packet with any header
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 9000))
                choose = fdp.ConsumeIntInRange
                hdr = Hdr(CID if choose(0, 7) else choose(0, 5), 2 if choose(0, 7) else choose(0, 9),
                          choose(1000, 1003), (80, 81, 1 << 30, choose(0, 0xFFFFFFFF))[choose(0, 3)],
                          len(payload) if fdp.ConsumeBool() else choose(0, 0xFFFFFFFF),
                          1 if choose(0, 7) else choose(0, 3), choose(0, 9), choose(0, 3),
                          choose(0, 1 << 20), choose(0, 0xFFFFFFFF)).pack()
                out = [hdr, payload] if payload and fdp.ConsumeBool() else [hdr + payload]
                if len(drv.queues[1].free_desc) >= len(out) + 1:
                    drv.submit(1, out, [])
            elif step == 3:  # shorter than a header
                if drv.queues[1].free_desc:
                    drv.submit(1, [fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, HDR.size - 1)) or b"x"], [])
            elif step == 4:  # rx buffers
                for _ in range(fdp.ConsumeIntInRange(1, 4)):
                    lens = [HDR.size, 4096] if fdp.ConsumeBool() else [fdp.ConsumeIntInRange(1, 20000)]
                    if len(drv.queues[0].free_desc) >= len(lens) + 1:
                        drv.post(0, [], lens)
                drv.kick(0)
            elif step == 5:  # the host side of guest-initiated connections
                try:
                    while len(host) < 16:
                        s, _ = srv.accept()
                        s.setblocking(False)
                        host.append(s)
                except BlockingIOError:
                    pass
                for s in list(host):
                    act = fdp.ConsumeIntInRange(0, 3)
                    try:
                        if act == 0:
                            s.recv(fdp.ConsumeIntInRange(1, 1 << 16))
                        elif act == 1:
                            s.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8192)) or b"h")
                        elif act == 2:
                            s.close()
                            host.remove(s)
                    except OSError:
                        pass
            elif step == 6:  # a host program connecting through PATH
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    s.setblocking(False)
                    line = (b"CONNECT %d\n" % fdp.ConsumeIntInRange(0, 100) if fdp.ConsumeBool()
                            else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
                    s.send(line or b"\n")
                except OSError:
                    pass
                host.append(s)
            elif step == 7 and fdp.ConsumeBool():  # a hand-made descriptor on either queue
                qi = fdp.ConsumeIntInRange(0, 1)
                head = fdp.ConsumeIntInRange(0, 15)
                drv.write_desc(qi, head, fdp.ConsumeIntInRange(0, 1 << 21), fdp.ConsumeIntInRange(0, 1 << 17),
                               fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, 17))
                drv.publish(qi, head)
                drv.kick(qi)
                hand_made = True
            elif step == 8 and fdp.ConsumeBool():
                drv.init()
            assert dev.connection_count() <= max_conns
            assert dev.buffered_bytes() <= max_conns * (buf_size + 16) + MAX_CTRL * HDR.size
            if not hand_made:
                assert not drv.needs_reset, dev.broken
                for u in drv.collect(0):
                    if u.written == 0:
                        continue
                    assert u.written >= HDR.size, u
                    h = Hdr.unpack(u.data)
                    assert h.dst_cid == CID and 1 <= h.op <= 7, h
                    assert h.len == u.written - HDR.size and h.len <= MAX_PAYLOAD, (h, u.written)
                drv.collect(1)
            elif drv.needs_reset:  # a hand-made ring may fail the device: start again
                drv.init()
                hand_made = False
    finally:
        dev.close()
        for s in host:
            s.close()
        srv.close()
        drv.ram.check_guards()
    assert threading.active_count() <= threads_before, "the socket thread outlived close"
    assert len(os.listdir("/proc/self/fd")) <= fds_before, "an fd left open after close"


if __name__ == "__main__":
    common.run(one_input, ("vdm_vsock.device", "vdm_vsock.host", "vdm_vsock.conn", "vdm_vsock.packet",
                           "vdm.poller", "vdm.virtqueue", "vdm.chain"))
    sys.exit(0)
