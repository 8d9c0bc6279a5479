"""The host end of the guest kit's ``nettcp both`` workload: send the guest a file, then take one.

The guest (busybox ``nc``) connects twice: first it reads until the peer closes, then it sends its
own file and closes. The peer records timings, the byte count and MD5 of what it received.

From Python (a thread; bind the socket yourself when it must live in a network namespace)::

    peer = TcpPeer(payload, timeout=60, srv=listen("10.0.2.2", 5555, 60))
    ...boot the guest...
    peer.close()
    peer.result  # rx_peer_s, tx_peer_s, tx_peer_bytes, tx_peer_md5, or peer_error
    # (and rx_start/rx_end, tx_start/tx_end: time.monotonic() at each accept and at the EOF)

As a script (standard library only, so it runs inside the KVM lab and in ``ip netns exec``)::

    python3 tests/net/tcp_peer.py 10.0.2.2 5555 2097152 [--tag T] [--timeout S]

prints ``PEER [T ]listening sent_md5=<md5>`` once it listens and
``PEER [T ]recv_bytes=<n> recv_md5=<md5>`` (or ``PEER [T ]error=<what>``) when it is done.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import threading
import time
from typing import Sequence


def listen(host: str, port: int, timeout: float) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR, backlog 2) whose accept gives up after ``timeout``."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(2)
    s.settimeout(timeout)
    return s


class TcpPeer:
    """Serves ``payload`` on the first connection to ``srv`` and drains the second, on a thread."""

    def __init__(self, payload: bytes, timeout: float, srv: socket.socket) -> None:
        self.payload = payload
        self.timeout = timeout
        self.srv = srv
        self.result: dict = {}
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, name="tcp-peer", daemon=True)
        self.thread.start()

    @staticmethod
    def _drain(c: socket.socket) -> tuple[int, str]:
        h, n = hashlib.md5(), 0
        while True:
            d = c.recv(1 << 16)
            if not d:
                return n, h.hexdigest()
            h.update(d)
            n += len(d)

    def _serve(self) -> None:
        r = self.result
        try:
            c, _ = self.srv.accept()
            self.conn = c
            with c:
                c.settimeout(self.timeout)
                t0 = r["rx_start"] = time.monotonic()
                c.sendall(self.payload)
                c.shutdown(socket.SHUT_WR)
                self._drain(c)  # the guest's nc closes once it has read everything
                r["rx_end"] = time.monotonic()
                r["rx_peer_s"] = r["rx_end"] - t0
            c, _ = self.srv.accept()
            self.conn = c
            with c:
                c.settimeout(self.timeout)
                t0 = r["tx_start"] = time.monotonic()
                n, md5 = self._drain(c)
                r["tx_end"] = time.monotonic()
                r["tx_peer_s"] = r["tx_end"] - t0
                r["tx_peer_bytes"], r["tx_peer_md5"] = n, md5
        except OSError as e:
            r["peer_error"] = f"{type(e).__name__}: {e}"

    def close(self, wait: float = 5) -> None:
        """Wait up to ``wait`` s for the peer to finish, then stop it (shutting the listener wakes accept)."""
        self.thread.join(wait)
        for s in (self.conn, self.srv):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.thread.join(wait)
        self.srv.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("bytes", type=int, help="size of the file sent to the guest")
    ap.add_argument("--tag", default="", help="word printed after PEER (several peers in one log)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for each connection")
    a = ap.parse_args(argv)
    prefix = f"PEER {a.tag} " if a.tag else "PEER "
    payload = os.urandom(a.bytes)
    peer = TcpPeer(payload, a.timeout, listen(a.host, a.port, a.timeout))
    print(f"{prefix}listening sent_md5={hashlib.md5(payload).hexdigest()}", flush=True)
    peer.thread.join()
    peer.close(0)
    r = peer.result
    if "tx_peer_md5" in r:
        print(f"{prefix}recv_bytes={r['tx_peer_bytes']} recv_md5={r['tx_peer_md5']}", flush=True)
        return 0
    print(f"{prefix}error={r.get('peer_error', 'unknown')}".replace("\n", " "), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
