"""The guest kit's vsock test program for the real-guest tests, and the host programs it talks to.

:func:`build` compiles ``scripts/guestkit/vsock_test.c`` with the host's ``gcc -static`` (the
guest kit has no compiler; the binary needs nothing but the kernel); :func:`guest_spec` puts it
in the guest with the vsock modules and the ``vsock`` workload. The workload connects to the host
(``c_*`` results), then listens for the host (``l_*``); each side sends a seeded stream, shuts
its sending side and reads to the end. :class:`HostPeers` is the host's half: it serves
``PATH_<port>`` (reading slowly) and connects through ``PATH`` with ``CONNECT <port>``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "scripts" / "guestkit" / "vsock_test.c"

#: the guest's seeds for what it sends (the connect side, the listen side)
SEED_CONNECT, SEED_LISTEN = 7, 11

WORKLOAD = r"""
tries=0
while :; do
  out=$(/bin/vsock_test connect 2 "$P_port" "$P_bytes" 7 2>&1) && break
  tries=$((tries + 1))
  [ $tries -ge 20 ] && { result fail reason=connect msg=$(echo "$out" | tr ' ' _); return; }
  sleep 1
done
c=$(echo "$out" | tail -n1 | sed 's/\([a-z_]*\)=/c_\1=/g')
out=$(/bin/vsock_test listen "$P_lport" "$P_bytes" 11 2>&1) ||
  { result fail reason=listen msg=$(echo "$out" | tr ' ' _); return; }
l=$(echo "$out" | tail -n1 | sed 's/\([a-z_]*\)=/l_\1=/g')
result ok $c $l
"""


def build(out_dir: Path) -> Path:
    import pytest
    """The static test program, built from the repository's source (skips without gcc/libc.a)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt install gcc libc6-dev): it builds the vsock test program")
    out = out_dir / "vsock_test"
    r = subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"gcc -static could not build {SOURCE.name} (libc6-dev's libc.a missing?): "
                    f"{r.stderr[-300:]}")
    return out


def guest_spec(program: Path):  # -> vdm_lab.GuestSpec
    import vdm_lab

    return vdm_lab.GuestSpec(modules=["vmw_vsock_virtio_transport"], workloads={"vsock": WORKLOAD},
                             files={"/bin/vsock_test": program})


def stream(seed: int, n: int) -> bytes:
    """The bytes vsock_test sends for ``seed`` (xorshift64, low byte of each step)."""
    x, out, mask = seed or 1, bytearray(n), (1 << 64) - 1
    for i in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out[i] = x & 0xFF
    return bytes(out)


def fnv(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


class HostPeers:
    """The host programs: one serving ``PATH_<port>`` (a slow reader), one dialling the guest's
    ``lport`` through ``PATH``. Each reads to the end, then sends ``back`` and closes."""

    def __init__(self, path: str, port: int, lport: int, back: int, *, slow: float = 0.001,
                 echo: bool = False, nbytes: int = 0) -> None:
        """``echo``: print one ``vsock-peer`` line per connection (what arrived, compared with the
        guest's stream of ``nbytes``, and what goes back) -- for runs whose host side is elsewhere."""
        self.path, self.port, self.lport, self.slow = path, port, lport, slow
        self.echo, self.nbytes = echo, nbytes
        self.back_connect, self.back_listen = os.urandom(back), os.urandom(back)
        self.got_connect = bytearray()
        self.got_listen = bytearray()
        self.ok_line = ""
        self.errors: list[str] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(f"{path}_{port}")
        self._srv.listen(4)
        self._stop = False
        self._threads = [threading.Thread(target=self._serve, daemon=True),
                         threading.Thread(target=self._dial, daemon=True)]

    def start(self) -> HostPeers:
        for t in self._threads:
            t.start()
        return self

    def _talk(self, name: str, s: socket.socket, got: bytearray, back: bytes, slow: float) -> None:
        s.settimeout(600)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got.extend(chunk)
            if slow:
                time.sleep(slow)  # the slow reader: the guest's writes wait for credit
        if self.echo:  # before answering: the guest cannot finish (and the run end) before this line
            seed = SEED_CONNECT if name == "connect" else SEED_LISTEN
            ok = int(bytes(got) == stream(seed, self.nbytes))
            print(f"vsock-peer {name} rx={len(got)} rx_ok={ok} back={len(back)} back_fnv={fnv(back)} "
                  f"ok_line={self.ok_line.replace(' ', '_') or '-'}", flush=True)
        s.sendall(back)
        s.close()

    def _serve(self) -> None:
        try:
            self._srv.settimeout(600)
            s, _ = self._srv.accept()
            self._talk("connect", s, self.got_connect, self.back_connect, self.slow)
        except OSError as e:
            self.errors.append(f"serving {self.port}: {e}")

    def _dial(self) -> None:
        while not self._stop:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                s.sendall(f"CONNECT {self.lport}\n".encode())
                line = b""
                while not line.endswith(b"\n"):
                    c = s.recv(1)
                    if not c:
                        break
                    line += c
                if not line:  # nobody listens in the guest yet: the device closed us
                    s.close()
                    time.sleep(0.5)
                    continue
                self.ok_line = line.decode(errors="replace").strip()
                self._talk("listen", s, self.got_listen, self.back_listen, 0)
                return
            except OSError as e:
                s.close()
                if self._stop:
                    return
                self.errors.append(f"dialling {self.lport}: {e}")
                time.sleep(0.5)

    def close(self) -> None:
        self._stop = True
        self._srv.close()
        for t in self._threads:
            t.join(5)

    def check(self, res, nbytes: int) -> None:
        """The guest's ``vsock`` result against what the host sent and got (both directions)."""
        line = res.line
        assert res["c_tx"] == str(nbytes) and res["l_tx"] == str(nbytes), line
        sent_c, sent_l = stream(SEED_CONNECT, nbytes), stream(SEED_LISTEN, nbytes)
        assert bytes(self.got_connect) == sent_c, f"guest->host differs ({len(self.got_connect)}): {line}"
        assert bytes(self.got_listen) == sent_l, f"host->guest connection: guest bytes differ: {line}"
        assert res["c_tx_fnv"] == fnv(sent_c) and res["l_tx_fnv"] == fnv(sent_l), line
        assert res["c_rx"] == str(len(self.back_connect)) and res["c_rx_fnv"] == fnv(self.back_connect), line
        assert res["l_rx"] == str(len(self.back_listen)) and res["l_rx_fnv"] == fnv(self.back_listen), line
        assert self.ok_line.startswith("OK "), self.ok_line


def main(argv: list[str]) -> int:
    """``guestprog.py PATH PORT LPORT BYTES``: the host peers, run next to vdm (the KVM lab)."""
    path, port, lport, nbytes = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    peers = HostPeers(path, port, lport, nbytes, echo=True, nbytes=nbytes).start()
    print(f"vsock-peer started path={path}", flush=True)
    for t in peers._threads:
        t.join()
    for e in peers.errors:
        print(f"vsock-peer error {e}", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
