"""NBD servers for the nbd protocol tests: qemu-nbd and nbdkit (real, started in the test's tmp
directory on a Unix socket) and a small NBD server in Python that lies on purpose."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

QEMU_NBD = shutil.which("qemu-nbd")
NBDKIT = shutil.which("nbdkit")


def _wait_socket(path: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{what} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"{what} did not listen on {path}")


class Server:
    """A real NBD server process serving one image on a Unix socket; restartable."""

    def __init__(self, argv: list[str], sock: str, what: str) -> None:
        self.argv, self.sock, self.what = argv, sock, what
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Server:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_socket(self.sock, self.proc, self.what)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def qemu_nbd(tmp_path, image: str, name: str = "qemu-nbd") -> Server:
    """qemu-nbd exporting ``image`` byte for byte (-f raw), several clients, writeback cache."""
    if QEMU_NBD is None:
        pytest.skip("qemu-nbd is not installed (apt install qemu-utils)")
    sock = str(tmp_path / f"{name}.sock")
    argv = [QEMU_NBD, "-f", "raw", "-t", "-e", "8", "--cache=writeback", "--discard=unmap", "-k", sock, image]
    return Server(argv, sock, "qemu-nbd")


def nbdkit(tmp_path, image: str, *filters: str, name: str = "nbdkit") -> Server:
    """nbdkit's file plugin on ``image``; ``filters``: nbdkit options (``--filter=X``, ``-r``) and the
    filters' ``key=value`` parameters."""
    if NBDKIT is None:
        pytest.skip("nbdkit is not installed (apt install nbdkit)")
    sock = str(tmp_path / f"{name}.sock")
    argv = [NBDKIT, "-f", "-U", sock, *[a for a in filters if a.startswith("-")], "file", f"file={image}"]
    argv += [a for a in filters if not a.startswith("-")]
    return Server(argv, sock, "nbdkit")


# ---- a lying server ------------------------------------------------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
OPT_INFO = 6
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
FLAG_HAS_FLAGS = 1
FLAG_SEND_FLUSH = 1 << 2


def _recv(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = c.recv(n - len(out))
        if not chunk:
            raise ConnectionError("client went away")
        out += chunk
    return out


class LyingServer:
    """An NBD server (fixed newstyle, simple replies) whose read replies break the protocol.

    ``mode``: ``wrong_handle`` (the reply names a request never sent), ``short`` (half the data,
    then the connection closes), ``oversized`` (the data, then 4 KiB more than asked),
    ``bad_magic`` (a reply header with a wrong magic). Handshakes and writes are answered
    correctly; ``writes`` records (offset, length) of every write the client sent.
    """

    def __init__(self, tmp_path, mode: str, size: int = 1 << 20) -> None:
        self.mode, self.size = mode, size
        self.sock_path = str(tmp_path / f"lying-{mode}.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.sock_path)
        self.listener.listen(8)
        self.writes: list[tuple[int, int]] = []
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock_path}"

    def close(self) -> None:
        self._stop = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._client, args=(c,), daemon=True).start()

    def _opt_reply(self, c: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
        c.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _client(self, c: socket.socket) -> None:
        try:
            with c:
                c.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, 1 | 2))
                _recv(c, 4)
                while True:
                    magic, opt, length = struct.unpack(">QII", _recv(c, 16))
                    assert magic == IHAVEOPT
                    _recv(c, length)
                    if opt in (OPT_GO, OPT_INFO):
                        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH
                        self._opt_reply(c, opt, REP_INFO, struct.pack(">HQH", 0, self.size, flags))
                        self._opt_reply(c, opt, REP_ACK)
                        if opt == OPT_GO:
                            break
                    else:
                        self._opt_reply(c, opt, REP_ERR_UNSUP)
                self._transmission(c)
        except (ConnectionError, OSError, AssertionError, struct.error):
            pass

    def _transmission(self, c: socket.socket) -> None:
        while True:
            magic, _flags, rtype, handle, offset, length = struct.unpack(">IHHQQI", _recv(c, 28))
            if magic != REQUEST_MAGIC or rtype == 2:  # NBD_CMD_DISC
                return
            if rtype == 1:  # write: take the payload, answer honestly
                _recv(c, length)
                self.writes.append((offset, length))
                c.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
            elif rtype == 0:  # read: lie
                data = b"\xab" * length
                if self.mode == "wrong_handle":
                    c.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle ^ 0x5A5A) + data)
                elif self.mode == "short":
                    c.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + data[: length // 2])
                    return
                elif self.mode == "oversized":
                    c.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + data + b"\xcd" * 4096)
                else:  # bad_magic
                    c.sendall(struct.pack(">IIQ", 0xDEADBEEF, 0, handle) + data)
            else:
                c.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
