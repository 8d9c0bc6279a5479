"""Runs inside the KVM lab: boots the guest kit with vdm's consoles and talks to them.

Started by tests/console/test_realguest_console.py through the KVM lab (host Python over 9p).
Prints ``key=value`` lines the test checks. Scenarios (argv):

* ``serial``: ``vdm run --console serial,backend=socket:...`` with the kit's interactive shell on
  ttyS0. The client types commands (received through the UART's RX FIFO and interrupts), pastes a
  few KiB into ``head -c N > file`` and compares the guest's md5 with its own, and reads
  /proc/tty/driver/serial to see the port type and its tx/rx counters.
* ``virtio``: ``vdm run --console serial,... --console virtio,...``; the kit's ``console``
  workload writes a token to /dev/hvc0 and waits for it to come back; the client echoes it and
  reads the workload's result on the serial console (the guest's /dev/console).
* ``consoles``: both in one guest (what the test runs: one L3 boot instead of two): the ``virtio``
  guest's workloads are ``console,shell``, so after the hvc0 round trip the kit's shell starts on
  ttyS0 (the guest's /dev/console) and the ``serial`` steps run on it; the same keys are printed
  (``virtio_vdm_rc`` is that guest's exit status too) and an error as ``consoles_error``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time

KIT = os.environ.get("VDM_GUESTKIT_DIR", os.path.expanduser("~/.cache/vdm/guestkit"))


def say(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


class Console:
    """The client end of one of vdm's console sockets."""

    def __init__(self, path: str, proc: subprocess.Popen) -> None:
        self.path = path
        self.proc = proc
        self.sock = self._connect()
        self.buf = b""
        self.seen = b""

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"vdm exited early with {self.proc.returncode}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                time.sleep(0.1)
        raise SystemExit(f"vdm's console socket {self.path} never appeared")

    def expect(self, pattern: bytes, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self.seen[-600:].decode("latin-1")
                raise SystemExit(f"timeout waiting for {pattern!r} on {self.path}; last output:\n{tail}")
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                tail = self.seen[-600:].decode("latin-1")
                try:
                    rc = self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    rc = "still running"
                raise SystemExit(
                    f"console {self.path} closed while waiting for {pattern!r} (vdm: {rc});"
                    f" last output:\n{tail}"
                )
            self.buf += data
            self.seen += data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class Guest:
    """``vdm run`` of the guest kit with the given consoles, each on a unix socket."""

    def __init__(self, name: str, params: str, consoles: list[str]) -> None:
        self.log = open(f"/mnt/{name}.vdm.log", "wb")
        paths = [f"/mnt/{name}-{kind}.sock" for kind in consoles]
        cmd = ["vdm", "-v", "run", "-k", f"{KIT}/vmlinuz", "-i", f"{KIT}/initrd.cpio.gz"]
        cmd += ["-m", "256", "-p", params]
        for kind, path in zip(consoles, paths):
            cmd += ["--console", f"{kind},backend=socket:{path}"]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.consoles = {kind: Console(path, self.proc) for kind, path in zip(consoles, paths)}

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        for c in self.consoles.values():
            c.sock.close()
        return rc


def serial() -> None:
    g = Guest("serial", "quiet vdmtest=shell vdmtest.exit=poweroff", ["serial"])
    try:
        _serial(g, g.consoles["serial"])
    finally:
        if g.proc.poll() is None:
            g.proc.kill()


def _serial(g: Guest, c: Console) -> None:
    c.expect(rb"VDMTEST shell", 600)
    say("serial_shell_s", round(time.monotonic() - g.t0, 1))
    time.sleep(1.0)
    c.send(b"cat /proc/tty/driver/serial; echo MARK$((6*7))\r")
    m = c.expect(rb"0: uart:(\S+) port:(\S+) irq:(\d+) tx:(\d+) rx:(\d+)\s", 120)
    say("serial_uart", m.group(1).decode())
    say("serial_port", m.group(2).decode())
    say("serial_irq", m.group(3).decode())
    say("serial_tx_before", m.group(4).decode())
    say("serial_rx_before", m.group(5).decode())
    c.expect(rb"MARK42", 120)
    say("serial_typed_command", "ok")
    # a paste: 40 lines of 64 bytes sent at once, far more than the 16-byte FIFO
    # (busybox ash reads its command line in raw mode; type-ahead sent before the command runs may
    # be discarded by the shell, as on any terminal -- so wait until head is about to read).
    # head -c stops at the paste's length: no end-of-file character is typed, so a paste that
    # loses or gains a byte leaves head waiting (a timeout showing the guest's output) instead of
    # an EOF reaching the login shell, which would end it and power the guest off.
    row = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW"
    data = b"".join(f"{i:03d} {row}\n".encode() for i in range(40))
    c.send(f"echo READY$((3+4)); head -c {len(data)} > /tmp/paste\r".encode())
    c.expect(rb"READY7", 120)
    time.sleep(2.0)
    t = time.monotonic()
    c.send(data)
    c.send(b"md5sum /tmp/paste; wc -c < /tmp/paste; echo DONE$((1+1))\r")
    m = c.expect(rb"([0-9a-f]{32})  /tmp/paste", 300)
    say("serial_paste_bytes", len(data))
    say("serial_paste_md5_match", m.group(1).decode() == hashlib.md5(data).hexdigest())
    c.expect(rb"DONE2", 120)
    say("serial_paste_s", round(time.monotonic() - t, 2))
    c.send(b"cat /proc/tty/driver/serial; grep -E 'serial|ttyS' /proc/interrupts; echo END$((2+2))\r")
    m = c.expect(rb"0: uart:\S+ port:\S+ irq:\d+ tx:(\d+) rx:(\d+)\s", 120)
    say("serial_rx_after", m.group(2).decode())
    m2 = c.expect(rb"\n\s*(\d+):\s+(\d+)\s+.*?(serial|ttyS)", 60)
    say("serial_irq_line", m2.group(1).decode())
    say("serial_irq_count", m2.group(2).decode())
    c.expect(rb"END4", 60)
    c.send(b"exit\r")
    c.expect(rb"VDMTEST DONE", 120)
    say("serial_vdm_rc", g.finish())
    say("serial_total_s", round(time.monotonic() - g.t0, 1))


def virtio() -> None:
    # hvc0 comes from a module the kit's /init loads after it opened /dev/console, so the guest's
    # /dev/console is a UART (console=ttyS0 last wins) and the workload talks to /dev/hvc0
    g = Guest("virtio", "quiet console=ttyS0 vdmtest=console vdmtest.exit=poweroff", ["serial", "virtio"])
    try:
        _virtio(g, g.consoles["virtio"], g.consoles["serial"])
    except SystemExit:
        tail = g.consoles["serial"].seen[-1500:].decode("latin-1").replace("\n", " | ")
        say("virtio_ttyS0_tail", tail)
        raise
    finally:
        if g.proc.poll() is None:
            g.proc.kill()


def _hvc_round_trip(g: Guest, hvc: Console, tty: Console) -> None:
    m = hvc.expect(rb"VDMTEST HVC-PING (\S+)", 1200)  # a loaded 2-core host makes L3 boots slow
    say("virtio_ping_s", round(time.monotonic() - g.t0, 1))
    hvc.send(b"pong " + m.group(1) + b"\n")
    m = tty.expect(rb"VDMTEST RESULT console (\S+)(.*?)\r?\n", 120)
    say("virtio_console_result", m.group(1).decode())
    say("virtio_console_detail", m.group(2).decode().strip().replace(" ", ","))


def _virtio(g: Guest, hvc: Console, tty: Console) -> None:
    _hvc_round_trip(g, hvc, tty)
    tty.expect(rb"VDMTEST DONE", 120)
    say("virtio_vdm_rc", g.finish())
    say("virtio_total_s", round(time.monotonic() - g.t0, 1))


def consoles() -> None:
    params = "quiet console=ttyS0 vdmtest=console,shell vdmtest.exit=poweroff"
    g = Guest("consoles", params, ["serial", "virtio"])
    try:
        _hvc_round_trip(g, g.consoles["virtio"], g.consoles["serial"])
        _serial(g, g.consoles["serial"])  # the shell comes after the console workload, on ttyS0
        say("virtio_vdm_rc", g.proc.returncode)
    except SystemExit:
        tail = g.consoles["serial"].seen[-1500:].decode("latin-1").replace("\n", " | ")
        say("consoles_ttyS0_tail", tail)
        raise
    finally:
        if g.proc.poll() is None:
            g.proc.kill()


if __name__ == "__main__":
    for what in sys.argv[1:]:
        try:
            {"serial": serial, "virtio": virtio, "consoles": consoles}[what]()
        except SystemExit as e:
            say(f"{what}_error", str(e).replace("\n", " | ")[:2000])
        finally:
            for f in (f"/mnt/{what}.vdm.log",):
                if os.path.exists(f):
                    with open(f, "rb") as log:
                        size = log.seek(0, 2)
                        log.seek(max(0, size - 1500))
                        tail = log.read().decode("latin-1").replace("\n", " | ")
                    say(f"{what}_vdm_log_bytes", size)
                    say(f"{what}_vdm_log_tail", tail)
