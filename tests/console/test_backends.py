"""Console backends: pty, unix socket, file, null, stdio under a pty, and lossless bounded input."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from vdm.errors import UserError
from vdm.interrupts import RecordingIrqLine
from vdm_console.backends import (
    FileBackend,
    NullBackend,
    PtyBackend,
    SocketBackend,
    StdioBackend,
    open_backend,
)
from vdm_console.uart import Uart16550


class Collector:
    """A consumer that pulls everything as soon as it is told (a guest with infinite room)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.data = bytearray()
        self.cond = threading.Condition()
        backend.start(self.on_input)

    def on_input(self) -> None:
        with self.cond:
            self.data += self.backend.read(1 << 20)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> bytes:
        with self.cond:
            self.cond.wait_for(lambda: len(self.data) >= n, timeout)
            return bytes(self.data)


def read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        import select

        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            out += os.read(fd, n - len(out))
    return out


# ---- pty ----------------------------------------------------------------------------------------


def test_pty_round_trip(capfd):
    b = PtyBackend()
    try:
        assert b.path.startswith("/dev/pts/")
        assert b.path in capfd.readouterr().err  # the path is printed for the user
        assert not b.connected()
        b.write(b"nobody listens")
        assert b.dropped_output == len(b"nobody listens")
        c = Collector(b)
        fd = os.open(b.path, os.O_RDWR | os.O_NOCTTY)
        try:
            assert b.connected()
            os.write(fd, b"typed keys\x03\x01")
            assert c.wait(12) == b"typed keys\x03\x01"  # raw: ^C is a byte, not a signal
            b.write(b"guest says hi\n")
            assert read_exactly(fd, 14) == b"guest says hi\n"  # raw: no \r added
            time.sleep(0.05)
            assert c.data == b"typed keys\x03\x01"  # our output did not echo back as input
        finally:
            os.close(fd)
        # the client left; a new one can attach
        fd = os.open(b.path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"again")
            assert c.wait(17).endswith(b"again")
        finally:
            os.close(fd)
    finally:
        b.close()


# ---- unix socket -------------------------------------------------------------------------------


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def test_socket_reconnect(tmp_path):
    path = str(tmp_path / "console.sock")
    b = SocketBackend(path)
    try:
        c = Collector(b)
        b.write(b"before anyone")  # dropped: no client
        s1 = connect(path)
        assert wait_until(lambda: b.connected)
        s1.sendall(b"one")
        assert c.wait(3) == b"one"
        b.write(b"to-one")
        assert s1.recv(100) == b"to-one"
        s1.close()
        assert wait_until(lambda: not b.connected)
        s2 = connect(path)
        assert wait_until(lambda: b.connected)
        s2.sendall(b"two")
        assert c.wait(6) == b"onetwo"
        b.write(b"to-two")
        assert s2.recv(100) == b"to-two"
        assert b.clients_served == 2
        s2.close()
    finally:
        b.close()
    assert not os.path.exists(path)


def test_socket_one_client_at_a_time(tmp_path):
    path = str(tmp_path / "c.sock")
    b = SocketBackend(path)
    try:
        c = Collector(b)
        s1 = connect(path)
        assert wait_until(lambda: b.connected)
        s2 = connect(path)  # waits in the backlog
        s2.sendall(b"second")
        s1.sendall(b"first")
        assert c.wait(5) == b"first"
        time.sleep(0.05)
        assert c.data == b"first"
        s1.close()
        assert c.wait(11) == b"firstsecond"
        s2.close()
    finally:
        b.close()


def test_socket_replaces_stale_socket_but_not_a_file(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    SocketBackend(path).close()
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    with pytest.raises(UserError, match="not a socket"):
        SocketBackend(str(regular))
    assert regular.read_text() == "keep me"


# ---- file and null -----------------------------------------------------------------------------


def test_file_appends(tmp_path):
    log = tmp_path / "boot.log"
    log.write_bytes(b"old boot\n")
    b = FileBackend(str(log))
    assert not b.has_input
    b.start(lambda: pytest.fail("a file has no input"))
    b.write(b"new ")
    b.write(b"boot\n")
    b.close()
    b2 = open_backend(f"file:{log}")
    b2.write(b"third\n")
    b2.close()
    assert log.read_bytes() == b"old boot\nnew boot\nthird\n"


def test_file_in_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="console log file"):
        FileBackend(str(tmp_path / "no" / "such" / "dir.log"))


def test_null_discards_and_has_no_input():
    b = open_backend("null")
    assert isinstance(b, NullBackend)
    b.start(lambda: None)
    b.write(b"gone")
    assert b.read(10) == b"" and b.pending() == 0
    b.close()


@pytest.mark.parametrize(
    "spec,error",
    [("bogus", "unknown console backend"), ("socket", "give a path"), ("file:", "give a path"),
     ("pty:/x", "takes no path")],
)
def test_open_backend_rejects_bad_specs(spec, error):
    with pytest.raises(UserError, match=error):
        open_backend(spec)


def test_open_backend_kinds(tmp_path):
    for spec, cls in ((f"socket:{tmp_path}/a.sock", SocketBackend), (f"file:{tmp_path}/a.log", FileBackend),
                      ("pty", PtyBackend), ("null", NullBackend)):
        b = open_backend(spec, **({"announce": False} if spec == "pty" else {}))
        assert isinstance(b, cls)
        b.close()


# ---- bounded input, slow consumer --------------------------------------------------------------


def test_bounded_input_without_loss_when_consumer_is_slow(tmp_path):
    path = str(tmp_path / "slow.sock")
    b = SocketBackend(path, input_buffer=64)
    data = os.urandom(256 * 1024)
    got = bytearray()
    high_water = 0
    arrived = threading.Event()
    b.start(arrived.set)
    client = connect(path)
    sender = threading.Thread(target=client.sendall, args=(data,))
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while len(got) < len(data) and time.monotonic() < deadline:
            high_water = max(high_water, b.pending())
            chunk = b.read(10)  # a consumer with a tiny FIFO
            if chunk:
                got += chunk
            else:
                arrived.wait(0.05)
                arrived.clear()
        sender.join(5)
        assert bytes(got) == data
        assert high_water <= 64  # the buffer stayed bounded: the rest waited in the socket
    finally:
        client.close()
        b.close()


def test_uart_with_slow_guest_loses_nothing(tmp_path):
    path = str(tmp_path / "uart.sock")
    b = SocketBackend(path, input_buffer=128)
    uart = Uart16550(RecordingIrqLine(), b)
    uart.write(2, 1, 0x81)  # FIFO on, trigger 8
    data = bytes(range(256)) * 64
    client = connect(path)
    threading.Thread(target=client.sendall, args=(data,), daemon=True).start()
    got = bytearray()
    deadline = time.monotonic() + 30
    try:
        while len(got) < len(data) and time.monotonic() < deadline:
            lsr = uart.read(5, 1)
            assert not lsr & 0x02, "overrun"
            if lsr & 0x01:
                got.append(uart.read(0, 1))
            else:
                time.sleep(0.0005)
        assert bytes(got) == data
    finally:
        client.close()
        uart.close()


# ---- stdio -------------------------------------------------------------------------------------


def test_stdio_without_a_terminal_reads_a_pipe_and_writes_a_pipe():
    rin, win = os.pipe()
    rout, wout = os.pipe()
    b = StdioBackend(in_fd=rin, out_fd=wout)
    try:
        assert not b.is_tty and b.window_size() is None
        c = Collector(b)
        os.write(win, b"\x01x is data here")  # no escapes without a terminal
        assert c.wait(15) == b"\x01x is data here"
        b.write(b"out")
        assert os.read(rout, 10) == b"out"
        os.close(win)  # end of input: the thread ends quietly, output still works
        time.sleep(0.05)
        b.write(b"more")
        assert os.read(rout, 10) == b"more"
    finally:
        b.close()
        for fd in (rin, rout, wout):
            os.close(fd)


def test_stdio_with_closed_stdin_has_no_input():
    closed = 4000  # vdm started with stdin closed: fd 0 is not open
    with pytest.raises(OSError):
        os.fstat(closed)
    r, w = os.pipe()
    b = StdioBackend(in_fd=closed, out_fd=w)
    assert not b.has_input
    b.start(lambda: None)
    b.write(b"still prints")
    assert os.read(r, 100) == b"still prints"
    b.close()
    os.close(r)
    os.close(w)


CHILD = r"""
import os, signal, sys, time
# the dispositions a terminal user's shell gives: a suite started under nohup or as a background
# job (SIGHUP/SIGINT ignored, inherited through exec) must not change what is tested here
signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
from vdm_console.backends import StdioBackend
mode = sys.argv[1]
quit_flag = []
b = StdioBackend(on_quit=(lambda: quit_flag.append(1)) if mode == "quit-callback" else None)
got = bytearray()
b.start(lambda: got.extend(b.read(100)))
os.write(1, b"READY\n")
if mode == "close":
    time.sleep(0.3); b.close(); os.write(1, b"CLOSED\n"); time.sleep(5)
elif mode == "exception":
    time.sleep(0.3); raise RuntimeError("boom")
elif mode == "exit":
    time.sleep(0.3); sys.exit(3)
elif mode in ("sigterm", "sighup", "ctrl-a-x"):
    time.sleep(30)
elif mode == "quit-callback":
    while not quit_flag: time.sleep(0.01)
    os.write(1, b"GOT:" + bytes(got) + b"\n")
"""


def _lflag(fd: int) -> int:
    return termios.tcgetattr(fd)[3]


@pytest.mark.parametrize("mode", ["close", "exception", "exit", "sigterm", "sighup", "ctrl-a-x"])
def test_stdio_terminal_restored_on_every_exit_path(mode):
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert _lflag(slave) & termios.ECHO and _lflag(slave) & termios.ICANON
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=slave, stdout=slave,
                                 stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            assert b"READY" in read_until(master, b"READY")
            assert not _lflag(slave) & (termios.ECHO | termios.ICANON | termios.ISIG)  # raw now
            if mode == "sigterm":
                child.send_signal(signal.SIGTERM)
            elif mode == "sighup":
                child.send_signal(signal.SIGHUP)
            elif mode == "ctrl-a-x":
                os.write(master, b"\x01x")
            if mode == "close":
                assert b"CLOSED" in read_until(master, b"CLOSED")
                assert termios.tcgetattr(slave) == before
                child.kill()
            rc = child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if mode == "sigterm":
            assert rc == -signal.SIGTERM  # the signal still did its job after the restore
        if mode == "exit":
            assert rc == 3
        if mode == "ctrl-a-x":
            assert rc != 0  # KeyboardInterrupt in the main thread
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def read_until(fd: int, token: bytes, timeout: float = 10.0) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while token not in out and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                out += os.read(fd, 1024)
            except OSError:
                break
    return out


def test_stdio_escape_sequences_under_a_pty():
    master, slave = os.openpty()
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, "quit-callback"], stdin=slave, stdout=slave,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert b"READY" in read_until(master, b"READY")
            # Ctrl-A Ctrl-A -> one Ctrl-A; Ctrl-A h -> help (to the terminal); Ctrl-A x -> quit
            os.write(master, b"ab\x01\x01c\x01h")
            assert b"Ctrl-A x" in read_until(master, b"this help")
            os.write(master, b"d\x01xIGNORED")
            out = read_until(master, b"cd\r\n")  # OPOST stays on: vdm's own lines get \r\n
            assert b"GOT:ab\x01cd\r\n" in out
            assert child.wait(10) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_window_size_and_sigwinch():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGWINCH handlers can only be installed from the main thread")
    master, slave = os.openpty()
    b = StdioBackend(in_fd=slave, out_fd=slave)
    sizes = []
    changed = threading.Event()
    b.add_resize_listener(lambda rows, cols: (sizes.append((rows, cols)), changed.set()))
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        b.start(lambda: None)
        assert b.window_size() == (30, 100)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        os.kill(os.getpid(), signal.SIGWINCH)
        assert changed.wait(5)
        assert sizes[-1] == (50, 132)
    finally:
        b.close()
        os.close(master)
        os.close(slave)


BACKGROUND = r"""
import fcntl, os, sys, termios
os.setsid()
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.ioctl(fd, termios.TIOCSCTTY, 0)  # the pty is now our controlling terminal
before = termios.tcgetattr(fd)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)  # a background job, as with `vdm run ... &`
    from vdm_console.backends import StdioBackend
    b = StdioBackend(in_fd=fd, out_fd=1)
    b.start(lambda: None)
    b.write(b"has_input=%d\n" % b.has_input)
    b.close()
    os._exit(0)
_, status = os.waitpid(pid, os.WUNTRACED)
if os.WIFSTOPPED(status):
    print("STOPPED by signal", os.WSTOPSIG(status)); os.kill(pid, 9)
print("unchanged" if termios.tcgetattr(fd) == before else "CHANGED")
"""


def test_stdio_in_background_leaves_the_terminal_alone():
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    try:
        out = subprocess.run([sys.executable, "-c", BACKGROUND, path], capture_output=True, timeout=30)
        assert out.stdout.decode().split() == ["has_input=0", "unchanged"], out.stderr.decode()
    finally:
        os.close(master)


def test_a_client_that_stops_reading_does_not_stall_the_guest(tmp_path):
    path = str(tmp_path / "stalled.sock")
    b = SocketBackend(path)
    uart = Uart16550(RecordingIrqLine(), b)
    client = connect(path)
    try:
        assert wait_until(lambda: b.connected)
        t = time.monotonic()
        for _ in range(200_000):  # a chatty guest, one THR write per byte, nobody reading
            uart.write(0, 1, ord("x"))
        elapsed = time.monotonic() - t
        assert elapsed < 20, f"guest output blocked for {elapsed:.1f} s"
        assert b.dropped_output > 0
        # the client comes back: it gets what was buffered, then new output
        client.settimeout(5)
        got = b""
        while len(got) < 1000:
            got += client.recv(65536)
        assert set(got) == {ord("x")}
        b.flush(5)
        uart.write(0, 1, ord("!"))
        deadline = time.monotonic() + 5
        while not got.endswith(b"!") and time.monotonic() < deadline:
            try:
                got += client.recv(65536)
            except socket.timeout:
                break
        assert got.endswith(b"!")
    finally:
        client.close()
        uart.close()


def test_a_pty_client_leaving_with_output_pending_drops_it(capfd):
    b = PtyBackend(announce=False)
    fd = os.open(b.path, os.O_RDWR | os.O_NOCTTY)
    try:
        for _ in range(1000):
            b.write(b"z" * 1000)  # fills the pty and our buffer; the client reads nothing
        assert read_exactly(fd, 10) == b"z" * 10
        os.close(fd)
        fd = -1
        # the writer gives up on the departed client and goes idle: it used to poll the master
        # (HUP) and retry the write (EAGAIN) in a loop, one CPU busy until someone attached again
        assert b.flush(3)
        assert b.dropped_output > 0
        fd = os.open(b.path, os.O_RDWR | os.O_NOCTTY)  # a new client gets new output (after what
        b.write(b"!")                                   # the kernel still held of the old)
        got = b""
        deadline = time.monotonic() + 5
        while not got.endswith(b"!") and time.monotonic() < deadline:
            got += read_exactly(fd, 1, timeout=0.5)
        assert got.endswith(b"!") and set(got[:-1]) <= {ord("z")}
    finally:
        if fd >= 0:
            os.close(fd)
        b.close()


def test_pty_output_is_buffered_not_blocking(capfd):
    b = PtyBackend(announce=False)
    fd = os.open(b.path, os.O_RDWR | os.O_NOCTTY)
    try:
        t = time.monotonic()
        # 4 MB with nobody reading: more than our 64 KiB buffer plus whatever the kernel's pty takes
        # (about 12 KiB on one kernel, several hundred KiB on others -- 100 KB was not enough there)
        for _ in range(4000):
            b.write(b"y" * 1000)
        assert time.monotonic() - t < 5
        assert b.dropped_output > 0
        assert read_exactly(fd, 100)[:1] == b"y"
        # quitting with a reader that stopped: the last words get close()'s 2 s, then the rest
        # is dropped -- not every buffered chunk waiting out its own write timeout
        t = time.monotonic()
        b.close()
        assert time.monotonic() - t < 4.5
    finally:
        os.close(fd)
        b.close()
