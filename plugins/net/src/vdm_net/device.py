"""virtio-net (device id 1) over a tap, with the offloads, mergeable buffers, control queue and MQ.

Queues: receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq (virtio 1.2, 5.1.2). N is
the tap's queue count when the driver negotiates VIRTIO_NET_F_MQ, else 1 -- then the control queue
is queue 2 whatever N is.

The file reads top to bottom: features and config space, queue roles, life cycle, statistics,
then the transmit path; the receive path is :mod:`vdm_net.receive` (a mixin), the control queue's
commands are :mod:`vdm_net.control`, the tap and the thread that watches it :mod:`vdm_net.backends`.

Data paths, per queue pair (one tap fd each; see :mod:`vdm_net.backends.poller` for the thread):

* transmit: a kick (or the poller, once a blocked tap is writable again) runs
  :meth:`VirtioNet.process_queue` for the transmit queue. Each chain's header and frame are checked
  (:func:`vdm_net.vnet_hdr.check_tx`); a bad one is dropped and counted, a good one written to the
  tap with one ``writev`` straight from guest memory, and completed at once. The fd is non-blocking:
  if the tap pushes back, the chain is kept and the poller resumes when the fd is writable -- no
  other queue waits. With the compiled fast path, the pair's :class:`vdm_net.fastsend.TxStep`
  goes first (:meth:`~vdm.virtqueue.Virtqueue.serve_compiled`: take, check by the same rules,
  writev, publish, in one call per batch); the first chain it declines takes the path above.
* receive (:mod:`vdm_net.receive`, a mixin of the device): when the tap fd is readable (or the
  driver adds buffers) frames are read into a bounce buffer and copied into the driver's buffers,
  spread over several with MRG_RXBUF. With no buffers left the frame stays in the bounce buffer,
  the pair stops reading the tap (the kernel queues behind it), and the driver's next kick of the
  receive queue resumes it. Nothing is dropped for lack of buffers on our side. A frame's buffers
  are published with one used-index update, never split (with the frames before it, up to
  ``RX_PUBLISH`` buffers, and always before the pair stalls); the interrupt is decided once per
  batch of up to ``RX_BUDGET`` frames. With the compiled fast path, a frame whose buffers are all
  there and plain goes in one call (:meth:`~vdm.virtqueue.Virtqueue.fill_compiled`: take, copy,
  num_buffers, publish); any other takes the ``pop`` path above (its frames published first, so
  the used ring keeps their order).

Control queue (:mod:`vdm_net.control`): rx-mode, MAC-table and VLAN-filter commands are checked,
remembered and answered OK, but filter nothing (the tap hands over every frame); MAC_ADDR_SET changes
the MAC in the config space until the next reset (:meth:`VirtioNet.set_mac`); VQ_PAIRS_SET attaches
and detaches the tap's queues (:meth:`VirtioNet.set_active_pairs`; the kernel only steers frames to
attached ones); GUEST_OFFLOADS_SET re-sets TUNSETOFFLOAD (:meth:`VirtioNet.set_guest_offloads`).

Statistics: :meth:`VirtioNet.stats` -- packets and bytes each way, every drop by reason, and how
often the tap pushed back (``tx_tap_full``);
:meth:`VirtioNet.summary` is logged when the device closes.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections import Counter
from typing import TYPE_CHECKING

from vdm.device import VirtioDevice
from vdm.sg import slice_views
from vdm.virtqueue import DescriptorChain, Virtqueue

from . import features as nf
from .backends.offloads import offered_features, tun_offload_flags
from .backends.poller import TapPoller
from .backends.tap import Tap
from .config import NetConfig
from .control import CTRL_ERR, CTRL_OK, ControlQueue
from .queue_pair import QueuePair
from .receive import RX_BUDGET, RX_FILL_CHAINS, RX_PUBLISH, ReceivePath
from .vnet_hdr import HDR_LEN, HeaderError, HeaderPolicy, VnetHdr, check_tx

if TYPE_CHECKING:
    from .fastsend import TxStep

__all__ = ["CTRL_ERR", "CTRL_OK", "RX_BUDGET", "RX_FILL_CHAINS", "RX_PUBLISH", "VirtioNet"]

log = logging.getLogger(__name__)

DEVICE_ID_NET = 1
S_LINK_UP = 1

TX_BUDGET = 256
#: how long a reset waits for queue processing on other threads to finish
RESET_WAIT = 5.0
#: more iovecs than this are gathered into one buffer (IOV_MAX is 1024)
MAX_IOV = 1000

_CONFIG = struct.Struct("<6sHHH")


class VirtioNet(ReceivePath, VirtioDevice):
    """A virtio-net device whose link is a tap (or nothing: ``tap=None`` is a NIC with no cable)."""

    device_id = DEVICE_ID_NET
    name = "virtio-net"
    # the driver picks its queue pairs (MQ) and acknowledges announcements on the control queue
    control_queue_features = nf.bit(nf.F_MQ) | nf.bit(nf.F_GUEST_ANNOUNCE)

    def __init__(self, config: NetConfig, tap: Tap | None = None, *, mac_seed: str | None = None) -> None:
        npairs = len(tap.fds) if tap is not None else 1
        self.queue_max_sizes = (config.queue_size,) * (2 * npairs + 1)
        super().__init__()
        self.config = config
        self.tap = tap
        #: the MAC the device starts with; MAC_ADDR_SET changes :attr:`mac` until the next reset
        self.default_mac = config.guest_mac_bytes(mac_seed or (tap.name if tap is not None else "vdm-net"))
        self.mac = self.default_mac
        self.pairs = [QueuePair(i, tap.fds[i] if tap is not None else None) for i in range(npairs)]
        self.active_pairs = 1
        self.mtu = config.mtu
        self.control = ControlQueue(self)
        self._tx_policy = HeaderPolicy()
        self._rx_policy = HeaderPolicy()
        self._guest_offloads = 0
        self._poller: TapPoller | None = None
        self._poller_lock = threading.Lock()
        #: threads inside process_queue (thread id -> depth), so a reset can wait for them
        self._inflight: dict[int, int] = {}
        self._idle = threading.Condition()

    # ---- features and config space ---------------------------------------------------------------

    def device_features(self) -> int:
        b = nf.bit
        f = (
            b(nf.F_MAC) | b(nf.F_STATUS) | b(nf.F_CTRL_VQ) | b(nf.F_CTRL_RX) | b(nf.F_CTRL_RX_EXTRA)
            | b(nf.F_CTRL_VLAN) | b(nf.F_CTRL_MAC_ADDR)
        )
        if self.config.mrg_rxbuf:
            f |= b(nf.F_MRG_RXBUF)
        if len(self.pairs) > 1:
            f |= b(nf.F_MQ)
        if self.mtu is not None:
            f |= b(nf.F_MTU)
        if self.tap is not None and self.config.offload:
            f |= offered_features(self.tap.accepted_offloads)
        return nf.close_offer(f)

    def validate_features(self, features: int) -> str | None:
        return nf.dependency_violation(features)

    def config_space(self) -> bytes:
        status = S_LINK_UP if self.tap is not None else 0
        return _CONFIG.pack(self.mac, status, len(self.pairs), self.mtu or 0)

    # ---- queue roles -------------------------------------------------------------------------------

    def _role(self, index: int) -> tuple[str, QueuePair | None] | None:
        n = len(self.pairs) if self.has_feature(nf.F_MQ) else 1
        if index < 2 * n:
            return ("tx" if index & 1 else "rx", self.pairs[index // 2])
        if index == 2 * n and self.has_feature(nf.F_CTRL_VQ):
            return ("ctrl", None)
        return None

    # ---- life cycle ---------------------------------------------------------------------------------

    def on_activate(self) -> None:
        f = self.driver_features
        self._tx_policy = HeaderPolicy.for_tx(f, self.mtu)
        self.set_guest_offloads(f & nf.GUEST_OFFLOAD_MASK)
        self.control.reset()
        self._bind_tx_steps()
        # only the first pair is used until the driver asks for more (5.1.5)
        self.set_active_pairs(1)
        if self.tap is not None:
            with self._poller_lock:
                self._poller = TapPoller(self, self.pairs)
                self._poller.start()

    def _bind_tx_steps(self) -> None:
        """Give each pair with a tap fd the compiled transmit step (vdm_net.fastsend), when it is on."""
        from . import fastsend

        if not fastsend.ACTIVE:
            return
        for pair in self.pairs:
            if pair.fd is not None:
                pair.tx_step = fastsend.TxStep(pair.fd, self._tx_policy)

    def on_reset(self) -> None:
        with self._poller_lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()
        self._wait_idle()
        for pair in self.pairs:
            pair.clear(self.queues[pair.rx_queue], self.queues[pair.tx_queue])
        self.mac = self.default_mac
        if self.tap is not None:
            try:
                self.tap.set_offload(0)
            except OSError:
                pass

    def close(self) -> None:
        """Reset, log the counters and close the tap."""
        self.reset()
        log.info("%s: %s", self.name, self.summary())
        if self.tap is not None:
            self.tap.close()

    def summary(self) -> str:
        """One line of counters for logs: totals, drops by reason, packets per queue pair."""
        st = self.stats()
        drops = {k: v for k, v in sorted(st.items()) if "_dropped_" in k and v}
        per_pair = " ".join(
            f"{p.index}:{p.rx_stats['rx_packets']}/{p.tx_stats['tx_packets']}" for p in self.pairs
        )
        tap = self.tap.name if self.tap is not None else "no backend"
        return (
            f"{tap}: rx {st['rx_packets']} packets {st['rx_bytes']} bytes, tx {st['tx_packets']} packets "
            f"{st['tx_bytes']} bytes, dropped rx {st['rx_dropped']} tx {st['tx_dropped']}"
            + (f" {drops}" if drops else "")
            + f"; rx/tx packets per queue pair {per_pair}"
        )

    def _wake(self) -> None:
        poller = self._poller
        if poller is not None:
            poller.wake()

    # ---- what the control queue changes (vdm_net.control.NetControlTarget) -------------------------

    @property
    def queue_pairs(self) -> int:
        """How many queue pairs the device has (the tap's queue count)."""
        return len(self.pairs)

    @property
    def rx_mode(self) -> dict[int, bool]:
        """RX_* mode -> on/off, as the driver last set it (filters nothing: see the module doc)."""
        return self.control.rx_mode

    @property
    def mac_table(self) -> tuple[list[bytes], list[bytes]]:
        """(unicast, multicast) MAC tables the driver set."""
        return self.control.mac_table

    @property
    def vlans(self) -> set[int]:
        """VLAN ids the driver added."""
        return self.control.vlans

    def set_mac(self, mac: bytes) -> None:
        """The MAC in the config space, until the next reset."""
        self.mac = mac

    def set_active_pairs(self, n: int) -> None:
        """Use queue pairs 0..n-1; attach/detach the tap's queues to match."""
        self.active_pairs = n
        for pair in self.pairs:
            pair.enabled = pair.index < n
            if self.tap is not None and self.tap.multi_queue:
                try:
                    self.tap.set_queue_enabled(pair.index, pair.enabled)
                except OSError as e:
                    log.warning("%s: tap queue %d %s failed: %s", self.name, pair.index,
                                "attach" if pair.enabled else "detach", e)
        self._wake()

    def set_guest_offloads(self, offloads: int) -> None:
        """The receive offloads the driver takes now; tells the tap (may raise OSError)."""
        self._guest_offloads = offloads
        rx_features = (self.driver_features & ~nf.GUEST_OFFLOAD_MASK) | offloads
        self._rx_policy = HeaderPolicy.for_rx(rx_features, self.mtu)
        if self.tap is not None:
            self.tap.set_offload(tun_offload_flags(offloads))

    # ---- statistics ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: rx/tx packets and bytes, ``*_dropped`` totals and ``*_dropped_<reason>``."""
        total: Counter[str] = Counter()
        for counters in [c for p in self.pairs for c in (p.rx_stats, p.tx_stats)] + [self.control.stats]:
            for _ in range(100):  # another thread may add a key meanwhile: read it again
                try:
                    snapshot = dict(counters)
                    break
                except RuntimeError:
                    continue
            total.update(snapshot)
        for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped"):
            total.setdefault(key, 0)
        return dict(total)

    # ---- queues ------------------------------------------------------------------------------------

    def process_queue(self, queue: Virtqueue) -> None:
        role = self._role(queue.index)
        if role is None:
            return
        me = threading.get_ident()
        with self._idle:
            self._inflight[me] = self._inflight.get(me, 0) + 1
        try:
            if not self.activated:
                # A kick that passed the base class's checks just before a reset, and got here
                # after on_reset() cleared the pairs (it did not wait for us: we were not counted
                # yet). The rings are still mapped until the reset ends: taking a chain now would
                # leave it in the pair, to be sent (and written into, on receive) after the
                # driver set the queues up again.
                return
            kind, pair = role
            if kind == "rx":
                assert pair is not None
                self._receive(pair, queue)
            elif kind == "tx":
                assert pair is not None
                self._transmit(pair, queue)
            else:
                self.control.process(queue)
        finally:
            with self._idle:
                left = self._inflight[me] - 1
                if left:
                    self._inflight[me] = left
                else:
                    del self._inflight[me]
                self._idle.notify_all()

    def _wait_idle(self, timeout: float = RESET_WAIT) -> None:
        """Wait until no other thread is inside :meth:`process_queue` (a kick racing a reset)."""
        me = threading.get_ident()
        with self._idle:
            if not self._idle.wait_for(lambda: not set(self._inflight) - {me}, timeout):
                log.warning("%s: queue processing still running %.0f s into a reset", self.name, timeout)

    # ---- transmit ------------------------------------------------------------------------------------

    def _transmit(self, pair: QueuePair, q: Virtqueue) -> None:
        if pair.tx_blocked:
            return  # the poller kicks this queue again once the tap is writable
        done = 0
        mark = TX_BUDGET
        step = pair.tx_step
        q.set_notification(False)
        while True:
            chain = pair.tx_chain
            pair.tx_chain = None
            if chain is None and step is not None:
                # the compiled step first (vdm_net.fastsend): it takes, checks, sends and completes
                # the frames _send would send, in one call; the first chain it declines is left
                # for pop below, and so for _send's checks, drops and pushback
                got = q.serve_compiled(step.fn, step.ctx)
                if got is None:
                    step = None  # (this queue cannot now: pop's path for the rest of the call)
                elif got[0] or got[1]:
                    done += self._count_compiled(pair, step, got[0], got[1])
            if chain is None:
                chain = q.pop()
            if chain is None:
                if q.set_notification(True):
                    q.set_notification(False)
                    continue
                break
            if not self._send(pair, chain):
                pair.tx_stats["tx_tap_full"] += 1
                pair.tx_chain = chain
                pair.tx_blocked = True
                self._wake()
                break
            # (completed at once: the guest frees the frame's skb on its completion, and TCP small
            # queues hold its sender until then; batching them, 16 at a time, saved ~1 us/frame
            # guest-free but was not measured in the KVM lab, so it is not done)
            q.push(chain, 0)
            done += 1
            if done >= mark:
                mark += TX_BUDGET
                # let other queues run; the poller comes back to this one
                q.set_notification(True)
                poller = self._poller
                if poller is not None:
                    poller.schedule(q.index)
                    break
        if done:
            self.signal_used(q)

    def _count_compiled(self, pair: QueuePair, step: TxStep, sent: int, failed: int) -> int:
        """Count what the compiled step did as _send counts it; the chains it completed."""
        nbytes, err = step.take()
        stats = pair.tx_stats
        if sent:
            stats["tx_packets"] += sent
            stats["tx_bytes"] += nbytes
        if failed:  # (one at most: the step declines every chain after a failed write)
            stats["tx_errors"] += 1
            if err == -1:
                self._drop_tx(pair, "short_write")
            else:
                name = errno.errorcode.get(err, "error") if err > 0 else "error"
                log.debug("%s: tap write failed: %s", self.name, os.strerror(err) if err > 0 else "?")
                self._drop_tx(pair, f"tap_{name.lower()}")
        return sent + failed

    def _drop_tx(self, pair: QueuePair, reason: str) -> bool:
        pair.tx_stats["tx_dropped"] += 1
        pair.tx_stats[f"tx_dropped_{reason}"] += 1
        return True

    def _send(self, pair: QueuePair, chain: DescriptorChain) -> bool:
        """Write one transmitted frame to the tap; False if the tap pushed back (try again later)."""
        readable = chain.readable
        one = readable[0] if len(readable) == 1 else None  # (a frame in one buffer: no gather)
        total = len(one) if one is not None else chain.readable_len
        if total < HDR_LEN:
            return self._drop_tx(pair, "short_header")
        head = bytes(one[: HDR_LEN + 64]) if one is not None else chain.read(0, HDR_LEN + 64)
        try:
            hdr = check_tx(VnetHdr.unpack(head), head[HDR_LEN:], total - HDR_LEN, self._tx_policy)
        except HeaderError as e:
            log.debug("%s: tx frame dropped: %s", self.name, e)
            return self._drop_tx(pair, e.reason)
        if pair.fd is None:
            return self._drop_tx(pair, "no_backend")
        views = [one[HDR_LEN:]] if one is not None else slice_views(readable, HDR_LEN, None)
        iov: list[bytes | memoryview] = [hdr.pack(), *views]
        if len(iov) > MAX_IOV:
            iov = [hdr.pack(), b"".join(bytes(v) for v in views)]
        try:
            n = os.writev(pair.fd, iov)
        except BlockingIOError:
            return False
        except OSError as e:
            log.debug("%s: tap write failed: %s", self.name, e)
            pair.tx_stats["tx_errors"] += 1
            return self._drop_tx(pair, f"tap_{errno.errorcode.get(e.errno or 0, 'error').lower()}")
        if n != total:
            pair.tx_stats["tx_errors"] += 1
            return self._drop_tx(pair, "short_write")
        pair.tx_stats["tx_packets"] += 1
        pair.tx_stats["tx_bytes"] += total - HDR_LEN
        return True
