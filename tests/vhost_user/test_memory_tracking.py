"""A connection that did not ack LOG_SHMFD (libblkio, a frontend without migration) can never get a
dirty log, so vdm does not remember the views it hands out for one (issue 18: that bookkeeping cost
a map and an unmap call per buffer); one that did (QEMU) keeps the dirty log's guarantees.

What a user checks: requests give the same data with and without LOG_SHMFD, on the compiled and the
Python virtqueue path (VDM_FASTPATH), and a later connection that acks LOG_SHMFD to the same
device gets every page it writes marked (tracking comes back with the feature).
"""

from __future__ import annotations

import os
import struct

from vdm_blk.device import S_OK, T_IN, T_OUT
from vdm_vhost_user.handler import OFFERED_PROTOCOL_FEATURES
from vdm_vhost_user.protocol import ProtocolFeature

from tests.vhost_user.test_dirty_log import PAGE, all_marked

WITHOUT_LOG = OFFERED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.LOG_SHMFD)


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def _traffic(fe, tag: int) -> list[bytes]:
    """Writes then reads of several shapes (one and several data buffers); what the guest got."""
    got = []
    for n, sector in ((512, 8), (PAGE, 16), (3 * PAGE, 40)):
        data = bytes([tag, n & 0xFF]) * (n // 2)
        u = fe.request(0, [hdr(T_OUT, sector), data[: n // 2], data[n // 2 :]], [1])
        assert u.data == bytes([S_OK])
        u = fe.request(0, [hdr(T_IN, sector)], [n // 2, n // 2, 1])
        assert u.data[-1] == S_OK and u.data[:n] == data
        got.append(bytes(u.data))
    u = fe.request(0, [hdr(T_IN, 0)], [PAGE, 1])  # the image's own first page
    got.append(bytes(u.data))
    return got


def test_requests_are_served_the_same_with_and_without_log_shmfd(blk_server, frontends, image):
    _, path, _ = blk_server
    results = []
    for proto in (OFFERED_PROTOCOL_FEATURES, WITHOUT_LOG, OFFERED_PROTOCOL_FEATURES):
        fe = frontends(path)
        fe.start(queues={0: 16}, protocol=proto)
        results.append(_traffic(fe, 7))
        fe.close()
    with open(image, "rb") as f:
        assert results[0][-1][:PAGE] == f.read(PAGE)
    assert results[0] == results[1] == results[2]


def test_a_later_connection_with_log_shmfd_gets_its_pages_marked(blk_server, frontends):
    _, path, _ = blk_server
    fe = frontends(path)
    fe.start(queues={0: 16}, protocol=WITHOUT_LOG)
    _traffic(fe, 1)
    fe.close()
    fe = frontends(path)
    fe.start(queues={0: 16})  # every offered protocol feature: LOG_SHMFD too
    fd, log = fe.set_log_base()
    try:
        fe.set_logging(True)
        header = fe.ram.alloc(0, PAGE)  # the header alone on its page, then page-aligned buffers
        fe.post(0, [hdr(T_IN, 16)], [PAGE, 1], in_align=PAGE)
        (u,) = fe.wait_used(0)
        assert u.data[-1] == S_OK
        data_page, status_page = header // PAGE + 1, header // PAGE + 2
        assert {data_page, status_page} <= all_marked(log)
        assert header // PAGE not in all_marked(log)
    finally:
        log.close()
        os.close(fd)
