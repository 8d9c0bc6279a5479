#!/usr/bin/env python3
"""The Xen lab's dom0 side of the domU's network and console checks (runs in dom0, /lab/peer.py).

``peer.py tcp HOST PORT MIB``: a TCP server for the guest kit's ``nettcp both``: the first
connection gets MIB MiB of random bytes, the second is read to its end; prints
``XENLAB PEER sent bytes=N md5=M`` and ``XENLAB PEER recv bytes=N md5=M``.

``peer.py serve MIB``: benchmarks/xenlab_pv.py's TCP peer, on every address, until killed: each
connection to port 5601 gets MIB MiB of random bytes, each one to 5602 is read to its end
(``XENLAB PEER served``/``drained bytes=N from=IP`` per connection).

``peer.py console SOCKET LOG``: a client of vdm's virtio-console socket backend; everything the
domU writes to its virtio console goes to LOG; once the domU's shell there says ``VDMHVC READY``,
types a command into it whose output only the domU can produce (``HVC-CMD-42-<its kernel>``)
and prints ``XENLAB HVC ready`` / ``XENLAB HVC cmd-ran out=...`` as it sees them.
"""

import hashlib
import os
import socket
import sys
import threading
import time


def tcp(host: str, port: int, mib: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(2)
    srv.settimeout(600)
    print("XENLAB PEER listening", flush=True)
    payload = os.urandom(mib << 20)
    conn, _ = srv.accept()
    with conn:
        conn.sendall(payload)
    print(f"XENLAB PEER sent bytes={len(payload)} md5={hashlib.md5(payload).hexdigest()}", flush=True)
    conn, _ = srv.accept()
    h, n = hashlib.md5(), 0
    with conn:
        conn.settimeout(300)
        while True:
            d = conn.recv(1 << 16)
            if not d:
                break
            h.update(d)
            n += len(d)
    print(f"XENLAB PEER recv bytes={n} md5={h.hexdigest()}", flush=True)


def serve(mib: int) -> None:
    payload = os.urandom(mib << 20)

    def source(conn: socket.socket, addr: tuple) -> None:
        with conn:
            conn.sendall(payload)
        print(f"XENLAB PEER served bytes={len(payload)} to={addr[0]}", flush=True)

    def sink(conn: socket.socket, addr: tuple) -> None:
        n = 0
        with conn:
            while d := conn.recv(1 << 16):
                n += len(d)
        print(f"XENLAB PEER drained bytes={n} from={addr[0]}", flush=True)

    def loop(port: int, handle) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(4)
        while True:
            conn, addr = srv.accept()
            threading.Thread(target=handle, args=(conn, addr), daemon=True).start()

    threading.Thread(target=loop, args=(5601, source), daemon=True).start()
    print("XENLAB PEER serving ports=5601,5602", flush=True)
    loop(5602, sink)


def console(path: str, log: str) -> None:
    deadline = time.monotonic() + 120
    while True:  # vdm creates the socket when it serves the device
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                print(f"XENLAB HVC no-socket path={path}", flush=True)
                return
            time.sleep(0.2)
    print("XENLAB HVC connected", flush=True)
    seen, typed, done = b"", False, False
    with open(log, "ab", buffering=0) as out:
        while True:
            d = s.recv(4096)
            if not d:
                break
            out.write(d)
            seen += d
            if not typed and b"VDMHVC READY" in seen:
                print("XENLAB HVC ready", flush=True)
                s.sendall(b"echo HVC-CMD-$((6*7))-$(uname -r)\n")
                typed = True
            if typed and not done:
                i = seen.find(b"HVC-CMD-42-")
                if i >= 0 and b"\n" in seen[i:]:
                    line = seen[i:].split(b"\n")[0].strip().decode(errors="replace")
                    print(f"XENLAB HVC cmd-ran out={line}", flush=True)
                    done = True


if __name__ == "__main__":
    if sys.argv[1] == "tcp":
        tcp(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        console(sys.argv[2], sys.argv[3])
