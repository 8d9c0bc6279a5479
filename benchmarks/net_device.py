"""Rough throughput of the virtio-net device with the in-process driver and a real tap.

    python3 benchmarks/net_device.py [--frames N] [--size BYTES]

Transmit: the driver posts batches of frames and kicks once per batch; the device writes them to
the tap (the namespace's stack discards them). Receive: a thread in the namespace blasts frames
into the tap through an AF_PACKET socket; the driver keeps the receive queue full. The driver's
own Python cost is included, so these are lower bounds for the device.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from vdm.testing import VirtioTestDriver
from vdm_net.config import NetConfig
from vdm_net.device import VirtioNet
from vdm_net.vnet_hdr import VnetHdr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the tests' netns helpers)

from tests.net.frames import BROADCAST, ETH_P_TEST, eth  # noqa: E402
from tests.net.netns import NetNs  # noqa: E402

BATCH = 128


class DeviceClock:
    """CPU time spent inside the device's queue processing, per queue (any thread; the time a
    thread waits for the GIL is not counted)."""

    def __init__(self, dev: VirtioNet) -> None:
        self.spent: dict[int, float] = {}
        inner = dev.process_queue

        def timed(queue) -> None:
            t0 = time.thread_time()
            try:
                inner(queue)
            finally:
                self.spent[queue.index] = self.spent.get(queue.index, 0.0) + time.thread_time() - t0

        dev.process_queue = timed  # type: ignore[method-assign]


def bench_tx(drv: VirtioTestDriver, dev: VirtioNet, frames: int, size: int) -> float:
    pkt = VnetHdr().pack() + eth(BROADCAST, dev.mac, ETH_P_TEST, bytes(size - 14))
    t0 = time.perf_counter()
    sent = 0
    while sent < frames:
        n = min(BATCH, frames - sent)
        for _ in range(n):
            drv.post(1, [pkt])
        drv.kick(1)
        drv.wait(1, n)
        sent += n
    return time.perf_counter() - t0


def bench_rx(ns: NetNs, drv: VirtioTestDriver, dev: VirtioNet, frames: int, size: int) -> tuple[float, int]:
    sock = ns.packet_socket("vdmtap0")
    pkt = eth(dev.mac, b"\x02\0\0\0\0\x09", ETH_P_TEST, bytes(size - 14))
    for _ in range(BATCH):
        drv.post(0, in_lens=[2048])
    drv.kick(0)
    stop = threading.Event()

    def blast() -> None:
        while not stop.is_set():
            for _ in range(64):
                try:
                    sock.send(pkt)
                except OSError:
                    time.sleep(0.0005)
            time.sleep(0)

    t = threading.Thread(target=blast, daemon=True)
    got = 0
    t0 = time.perf_counter()
    t.start()
    try:
        while got < frames:
            used = drv.wait(0, 1, timeout=10)
            got += len(used)
            for _ in used:
                drv.post(0, in_lens=[2048])
            drv.kick(0)
    finally:
        stop.set()
        t.join()
    return time.perf_counter() - t0, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1514)
    args = ap.parse_args()
    with NetNs() as ns:
        tap = ns.open_tap("vdmtap0")
        ns.up("vdmtap0")
        dev = VirtioNet(NetConfig(), tap)
        drv = VirtioTestDriver(dev, ram_size=64 << 20)
        drv.init()
        clock = DeviceClock(dev)
        try:
            dt = bench_tx(drv, dev, args.frames, args.size)
            print(f"tx: {args.frames} x {args.size} B in {dt:.2f} s = {args.frames / dt:,.0f} frames/s, "
                  f"{args.frames * args.size * 8 / dt / 1e6:,.0f} Mbit/s; inside the device "
                  f"{clock.spent.get(1, 0) / args.frames * 1e6:.1f} us/frame")
            dt, got = bench_rx(ns, drv, dev, args.frames, args.size)
            st = dev.stats()
            print(f"rx: {got} x {args.size} B in {dt:.2f} s = {got / dt:,.0f} frames/s, "
                  f"{got * args.size * 8 / dt / 1e6:,.0f} Mbit/s (device drops: {st['rx_dropped']}, "
                  f"stalls: {st.get('rx_stalls', 0)}; kernel tap tx_dropped: "
                  f"{ns.link_stats('vdmtap0').get('tx_dropped', 0)}); inside the device "
                  f"{clock.spent.get(0, 0) / max(got, 1) * 1e6:.1f} us/frame")
        finally:
            dev.reset()


if __name__ == "__main__":
    main()
