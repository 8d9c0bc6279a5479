"""vdm-net's receive CPU per frame with mergeable 4 KiB buffers, without a guest.

    python3 benchmarks/net_rx_merged.py [--frames 3000] [--size 8000] [--profile]

UDP datagrams of ``--size`` bytes are sent in a private network namespace to a neighbour behind
the tap (tap MTU 65000, a permanent neighbour entry for the device's MAC), so the device reads
frames of ``size + 42`` bytes from the tap and spreads each over 4 KiB buffers, as a Linux guest's
mergeable receive buffers take them. vdm.testing's driver keeps ``--bufs`` buffers posted. Prints
the CPU the device spent in the receive queue's processing (``time.thread_time``, whatever thread
ran it) per frame and per buffer; ``--profile`` adds a cProfile (thread CPU time) of that
processing. Run it with a checkout's ``core/src`` and ``plugins/net/src`` on PYTHONPATH to compare
builds (BENCHMARKS.md, KVM-lab TCP, session 9).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import sys
import threading
import time
from pathlib import Path

from vdm.testing import VirtioTestDriver
from vdm.virtqueue import Virtqueue
from vdm_net.config import NetConfig
from vdm_net.device import VirtioNet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the tests' netns helpers)

from tests.net.netns import NetNs  # noqa: E402

NEIGHBOUR = "10.9.0.2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--size", type=int, default=8000, help="UDP payload bytes per frame")
    ap.add_argument("--bufs", type=int, default=200, help="4 KiB receive buffers kept posted")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    with NetNs() as ns:
        try:
            from vdm_net.backends.tap import open_tap
        except ImportError:  # a checkout from before the backends/ split (2026-12-03)
            from vdm_net.tap import open_tap  # type: ignore[no-redef]
        tap = ns.call(open_tap, "vdmtap0", 1)
        ns.up("vdmtap0", address="10.9.0.1/24", mtu=65000)
        dev = VirtioNet(NetConfig(), tap)
        drv = VirtioTestDriver(dev, ram_size=64 << 20)
        drv.init()
        mac = ":".join(f"{b:02x}" for b in dev.mac)
        ns.run(["ip", "neigh", "replace", NEIGHBOUR, "lladdr", mac, "dev", "vdmtap0", "nud", "permanent"])
        spent = [0.0]
        prof = cProfile.Profile(time.thread_time) if a.profile else None
        inner = dev.process_queue

        def timed(q: Virtqueue) -> None:
            if q.index != 0:
                return inner(q)
            t0 = time.thread_time()
            try:
                if prof is not None:
                    prof.runcall(inner, q)
                else:
                    inner(q)
            finally:
                spent[0] += time.thread_time() - t0

        dev.process_queue = timed  # type: ignore[method-assign]
        for _ in range(a.bufs):
            drv.post(0, in_lens=[4096])
        drv.kick(0)
        sock = ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        payload = bytes(a.size)
        stop = threading.Event()

        def blast() -> None:
            while not stop.is_set():
                try:
                    sock.sendto(payload, (NEIGHBOUR, 9))
                except OSError:
                    time.sleep(0.0002)  # the tap's queue is full

        bufs = 0
        first = dev.stats()["rx_packets"]
        sender = threading.Thread(target=blast, daemon=True)
        t0 = time.perf_counter()
        sender.start()
        try:
            while dev.stats()["rx_packets"] - first < a.frames:
                used = drv.wait(0, 1, timeout=10)
                bufs += len(used)
                for _ in used:
                    drv.post(0, in_lens=[4096])
                drv.kick(0)
        finally:
            stop.set()
            sender.join()
        dt = time.perf_counter() - t0
        st = dev.stats()
        n = st["rx_packets"] - first
        print(f"{n} frames of {a.size + 42} bytes, {bufs} buffers in {dt:.2f} s; device receive CPU "
              f"{spent[0] / n * 1e6:.1f} us/frame, {spent[0] / max(bufs, 1) * 1e6:.1f} us/buffer; "
              f"dropped {st['rx_dropped']}")
        dev.reset()
        sock.close()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
