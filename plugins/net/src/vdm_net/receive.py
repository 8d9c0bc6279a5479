"""virtio-net's receive path (a mixin of :class:`vdm_net.device.VirtioNet`): frames from the tap into
the driver's receive buffers.

When the tap fd is readable (or the driver adds buffers) frames are read into the pair's bounce
buffer and copied into the driver's buffers, spread over several with MRG_RXBUF. Invariants: with no
buffers left the frame stays in the bounce buffer, the pair stops reading the tap (the kernel queues
behind it) and the driver's next kick of the receive queue resumes it -- nothing is dropped for lack
of buffers on our side; a frame's buffers are published with one used-index update, never split
(with the frames before it, up to ``RX_PUBLISH`` buffers, and always before the pair stalls); the
interrupt is decided once per batch of up to ``RX_BUDGET`` frames; the used ring keeps the frames'
order whichever way (compiled fill or pop) each one took. Receive state is touched only by the
receive queue's serialized processing.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from vdm.virtqueue import DescriptorChain, Virtqueue

from . import features as nf
from .queue_pair import QueuePair
from .vnet_hdr import HDR_LEN, NUM_BUFFERS_AT, HeaderError, HeaderPolicy, check_rx_into, pack_num_buffers_into

__all__ = ["RX_BUDGET", "RX_FILL_CHAINS", "RX_PUBLISH", "ReceivePath"]

log = logging.getLogger("vdm_net.device")

#: frames moved per call before other work gets a turn
RX_BUDGET = 64
#: delivered receive buffers published with one used-index update (whole frames only, and before
#: the queue stalls or the batch ends): one lock and publish per few frames instead of per frame,
#: while a polling driver still sees frames before the batch's end
RX_PUBLISH = 16
#: the most buffers one frame takes through the queue's compiled fill (more: the Python path)
RX_FILL_CHAINS = 64

# results of delivering one received frame
_DELIVERED, _NO_BUFFERS, _DROPPED = range(3)


class ReceivePath:
    """The receive side of :class:`vdm_net.device.VirtioNet` (module doc)."""

    if TYPE_CHECKING:  # (the device's, used here)
        name: str
        _rx_policy: HeaderPolicy

        def has_feature(self, bit: int) -> bool: ...
        def signal_used(self, q: Virtqueue) -> None: ...
        def _wake(self) -> None: ...

    def _receive(self, pair: QueuePair, q: Virtqueue) -> None:
        if pair.fd is None or not pair.enabled:
            return
        if pair.rx_stalled and q.has_available():
            pair.rx_stalled = False
            q.set_notification(False)
            self._wake()
        moved = 0
        done: list[tuple[DescriptorChain, int]] = []  # delivered, published together (below)
        # A frame goes to the guest with the queue's compiled fill when it can (one call: take the
        # buffers, copy, num_buffers, publish; the same chains, checks and bytes as pop's way),
        # else through pop (_deliver). The first is inline: it is most of the receive CPU.
        fill = q.fill_compiled
        use_fill = True
        max_chains = RX_FILL_CHAINS if self.has_feature(nf.F_MRG_RXBUF) else 1
        buf = pair.rx_buf
        stats = pair.rx_stats
        try:
            while moved < RX_BUDGET:
                if pair.rx_len == 0:
                    if not pair.rx_held and not q.has_available():
                        if self._publish_and_stall(pair, q, done):
                            break
                        continue
                    if not self._read(pair):
                        break
                if use_fill and not pair.rx_held:
                    total = pair.rx_len
                    try:
                        # (checked in place: the header is the driver's from here on, num_buffers
                        # 0; _deliver checking it again, if the frame waits, finds it as it left it)
                        check_rx_into(buf, total - HDR_LEN, self._rx_policy)
                    except HeaderError as e:
                        self._drop_rx(pair, e.reason.removeprefix("rx_"))
                        pair.rx_len = 0
                        continue
                    if done:  # (published first: the used ring keeps the frames' order)
                        q.push_many(done)
                        done.clear()
                    n = fill(buf, total, max_chains=max_chains, min_len=HDR_LEN, count_at=NUM_BUFFERS_AT)
                    if n:
                        stats["rx_packets"] += 1
                        stats["rx_bytes"] += total - HDR_LEN
                        pair.rx_len = 0
                        moved += 1
                        continue
                    if n is None:
                        use_fill = False
                result = self._deliver(pair, q, done)
                if result == _NO_BUFFERS:
                    if self._publish_and_stall(pair, q, done):
                        break
                    continue
                pair.rx_len = 0
                if result == _DELIVERED:
                    moved += 1
                    if len(done) >= RX_PUBLISH:
                        q.push_many(done)
                        done.clear()
        finally:
            if done:
                q.push_many(done)
        if moved:
            # once per batch: deciding per frame (as QEMU does per packet) was measured slower in
            # the KVM lab (BENCHMARKS.md, KVM-lab TCP, 2026-12-04 08:48-09:03): more interrupts and
            # refill kicks, each a nested exit there
            self.signal_used(q)

    def _publish_and_stall(
        self, pair: QueuePair, q: Virtqueue, done: list[tuple[DescriptorChain, int]]
    ) -> bool:
        """Out of buffers: publish the frames delivered so far (never after the stall), then _stall."""
        if done:
            q.push_many(done)
            done.clear()
        return self._stall(pair, q)

    def _stall(self, pair: QueuePair, q: Virtqueue) -> bool:
        """Out of buffers: ask for a kick and stop reading; False if buffers arrived meanwhile."""
        if q.set_notification(True):
            return False
        if not pair.rx_stalled:
            pair.rx_stalled = True
            pair.rx_stats["rx_stalls"] += 1
            self._wake()
        return True

    def _read(self, pair: QueuePair) -> bool:
        """Read one frame from the tap into the bounce buffer; False if there is none."""
        assert pair.fd is not None
        try:
            n = os.readv(pair.fd, [pair.rx_buf])
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EBADF, errno.EBADFD):
                return False
            log.debug("%s: tap read failed: %s", self.name, e)
            pair.rx_stats["rx_errors"] += 1
            return False
        if n < HDR_LEN:
            pair.rx_stats["rx_dropped"] += 1
            pair.rx_stats["rx_dropped_short_read"] += 1
            return True  # rx_len stays 0: read the next one
        pair.rx_len = n
        return True

    def _drop_rx(self, pair: QueuePair, reason: str) -> int:
        pair.rx_stats["rx_dropped"] += 1
        pair.rx_stats[f"rx_dropped_{reason}"] += 1
        return _DROPPED

    def _deliver(self, pair: QueuePair, q: Virtqueue, done: list[tuple[DescriptorChain, int]]) -> int:
        buf = pair.rx_buf
        total = pair.rx_len
        frame_len = total - HDR_LEN
        try:
            check_rx_into(buf, frame_len, self._rx_policy)  # (see _receive)
        except HeaderError as e:
            return self._drop_rx(pair, e.reason.removeprefix("rx_"))
        mergeable = self.has_feature(nf.F_MRG_RXBUF)
        held = pair.rx_held
        # (per-frame, not per-buffer, Python work where it can be: the KVM lab's receive is
        # CPU-bound on this thread, BENCHMARKS.md KVM-lab TCP session 9)
        have = sum(c.writable_len for c in held) if held else 0
        while have < total and (mergeable or not held):
            chain = q.pop()
            if chain is None:
                return _NO_BUFFERS
            wlen = chain.writable_len
            if wlen < HDR_LEN:
                # no room for even the header: the driver broke 5.1.6.3.1; hand it back empty
                pair.rx_stats["rx_bad_buffers"] += 1
                q.push(chain, 0)
                continue
            held.append(chain)
            have += wlen
        if have < total:
            # one buffer without MRG_RXBUF, too small for this frame: keep it for the next one
            return self._drop_rx(pair, "buffer_too_small")
        pair.rx_held = []
        pack_num_buffers_into(buf, len(held))
        data = memoryview(buf)[:total]
        off = 0
        for chain in held:
            views = chain.writable
            if len(views) == 1:  # (a Linux guest's receive buffer: one descriptor)
                v = views[0]
                n = min(len(v), total - off)
                v[:n] = data[off : off + n]
            else:
                n = chain.write(data[off:], 0)
            done.append((chain, n))
            off += n
        pair.rx_stats["rx_packets"] += 1
        pair.rx_stats["rx_bytes"] += frame_len
        return _DELIVERED
