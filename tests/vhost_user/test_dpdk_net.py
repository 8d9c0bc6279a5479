"""DPDK's virtio-user (``dpdk-testpmd --vdev net_virtio_user0``) as the vhost-user frontend of vdm-net.

A second frontend for ``vdm vhost-user --network``, written by other people than QEMU's: DPDK 22.11
(Debian 12, ``dpdk-testpmd`` is in the ``dpdk-dev`` package) drives the rings from user space with
no guest and no hugepages (``--no-huge -m 1024``: anonymous memory, shared with vdm through the
memfd the virtio-user PMD passes in SET_MEM_TABLE).

vdm runs inside a network namespace the test makes, on a tap there; testpmd runs outside and
reaches vdm's socket. Both directions move frames whose contents are checked:

- testpmd ``txonly`` (two-segment 264-byte UDP frames, so each one is a descriptor chain) →
  vdm's transmit queue → the tap: the tap's kernel counters must equal testpmd's TX count, and
  every frame an AF_PACKET socket on the tap reads must be the one testpmd builds, byte for byte
  in its headers.
- frames written into the tap (AF_PACKET, sizes 60..1514, each with its own payload) → vdm's
  receive queue → testpmd ``io`` forwarding, which sends each back unchanged → vdm's transmit
  queue → the tap: every frame must come back identical, and testpmd's stats must count exactly
  those frames received and sent.

Skipped with the reason when namespaces cannot be made (not root) or ``dpdk-testpmd`` is missing.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.net.frames import ETH_P_TEST, checksum, eth
from tests.net.netns import NetNs, netns_unavailable
from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [pytest.mark.slow]

TAP = "vdmtap0"
#: testpmd's port MAC (virtio-user's ``mac=`` devarg; vdm-net leaves the MAC to the frontend)
PMD_MAC = "52:54:00:12:34:56"
#: the destination testpmd's txonly writes (its default peer address for port 0)
TXONLY_PEER = bytes.fromhex("020000000000")
#: testpmd's txonly defaults: 198.18.0.1:9 -> 198.18.0.2:9, UDP, no UDP checksum
TXONLY_SRC, TXONLY_DST = socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2")
TXONLY_SEGS = (64, 200)
TXONLY_LEN = sum(TXONLY_SEGS)

SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4

TESTPMD = shutil.which("dpdk-testpmd")


def _skip_reason() -> str | None:
    why = netns_unavailable()
    if why:
        return why
    if TESTPMD is None:
        return "needs dpdk-testpmd (apt-get install dpdk-dev; scripts/install.sh does)"
    return None


class PmdProcess:
    """``dpdk-testpmd -i`` with a virtio-user port on ``sock``; commands go to its stdin.

    Its output is collected by a thread; :meth:`cmd` sends one command and waits for a regex in
    what follows it. :meth:`close` quits it (the port is stopped, the vhost-user connection closed).
    """

    def __init__(self, sock: Path, workdir: Path, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self.prefix = f"vdmtest{os.getpid()}x{threading.get_ident() % 10000}"
        # stdbuf: testpmd's printf output would sit in a full stdio buffer on a pipe
        self.args = [
            "stdbuf", "-o0", TESTPMD, "-l", "0-1", "--no-huge", "-m", "1024", "--no-pci",
            "--single-file-segments",
            "--file-prefix", self.prefix, "--log-level", "lib.eal:error",
            f"--vdev=net_virtio_user0,path={sock},queues=1,queue_size={queue_size},mac={PMD_MAC}",
            "--", "-i", "--nb-cores=1", "--total-num-mbufs=8192", "--rxq=1", "--txq=1",
        ]  # fmt: skip
        self.log = workdir / "testpmd.log"
        self._out = ""
        self._lock = threading.Condition()
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=workdir,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._wait(r"testpmd> ", 0, 60):
            self.close()
            raise RuntimeError(f"dpdk-testpmd did not start: {self.args}\n{self.output}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "w") as log:
            while True:
                chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                text = chunk.decode("utf-8", "replace")
                log.write(text)
                with self._lock:
                    self._out += text
                    self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    @property
    def output(self) -> str:
        with self._lock:
            return self._out

    def _wait(self, pattern: str, start: int, timeout: float) -> re.Match | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                m = rx.search(self._out, start)
                if m or self.proc.poll() is not None:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)

    def cmd(self, line: str, until: str = r"testpmd> ", timeout: float = 30) -> str:
        """Send ``line``; return the output from it to the first match of ``until`` after it."""
        assert self.proc.stdin is not None
        start = len(self.output)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        m = self._wait(until, start, timeout)
        if m is None:
            raise AssertionError(f"testpmd: no {until!r} after {line!r}:\n{self.output[start:]}")
        return self.output[start : m.end()]

    def stop(self) -> dict[str, int]:
        """``stop`` forwarding; port 0's forward statistics (``rx_packets``, ``tx_dropped``...)."""
        out = self.cmd("stop", r"Accumulated forward statistics[^\n]*\n(?:[^\n]*\n){3}")
        block = out[out.index("Forward statistics for port 0") :]
        stats: dict[str, int] = {}
        for key, value in re.findall(r"([RT]X-\w+):\s+(\d+)", block.split("Accumulated")[0]):
            stats[key.lower().replace("-", "_")] = int(value)
        return stats

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.proc.returncode


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest):
    """(namespace, vdm, testpmd): vdm-net on a tap in a namespace, testpmd's virtio-user on it."""
    why = _skip_reason()
    if why:
        pytest.skip(why)
    sock = tmp_path / "net.sock"
    with NetNs() as ns:
        ns.prepare_tap(TAP, address=None)
        vdm = VdmProcess(str(sock), "--network", f"mode=tap,tapif={TAP}", wrap=ns.argv([]))
        pmd = None
        try:
            pmd = PmdProcess(sock, tmp_path, getattr(request, "param", 256))
            yield ns, vdm, pmd
            assert pmd.close() == 0, pmd.output[-3000:]
            pmd = None
        finally:
            if pmd is not None:
                pmd.close()
            rc = vdm.stop()
        assert rc == 0, vdm.output
        assert vdm.count("closing the connection") == 0, vdm.output
        assert vdm.count("frontend connected") == 1, vdm.output


def _packet_socket(ns: NetNs) -> socket.socket:
    s = ns.packet_socket(TAP)
    s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root): hold every frame
    return s


def _drops(s: socket.socket) -> int:
    """Frames the kernel dropped on this socket since the last call (PACKET_STATISTICS)."""
    _, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return drops


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _wait_counter(ns: NetNs, key: str, want: int, timeout: float = 20) -> int:
    """Poll the tap's ``key`` counter until it reaches ``want`` (or stays short at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        got = ns.link_stats(TAP)[key]
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _txonly_frame_problem(frame: bytes) -> str | None:
    """What is wrong with a frame that should be testpmd's txonly UDP frame, or None."""
    if len(frame) != TXONLY_LEN:
        return f"length {len(frame)}, not {TXONLY_LEN}"
    if frame[:6] != TXONLY_PEER or frame[6:12] != _mac(PMD_MAC):
        return f"addresses {frame[:12].hex()}"
    if frame[12:14] != b"\x08\x00":
        return f"ethertype {frame[12:14].hex()}"
    ip = frame[14:34]
    if ip[0] != 0x45 or checksum(ip) != 0:
        return f"IPv4 header {ip.hex()} (version/length or checksum)"
    if struct.unpack("!H", ip[2:4])[0] != TXONLY_LEN - 14 or ip[9] != socket.IPPROTO_UDP:
        return f"IPv4 total length / protocol {ip.hex()}"
    if ip[12:16] != TXONLY_SRC or ip[16:20] != TXONLY_DST:
        return f"IPv4 addresses {ip[12:20].hex()}"
    udp = frame[34:42]
    if udp[:4] != struct.pack("!HH", 9, 9) or struct.unpack("!H", udp[4:6])[0] != TXONLY_LEN - 34:
        return f"UDP header {udp.hex()}"
    return None


def test_testpmd_txonly_frames_all_reach_the_tap_intact(served) -> None:
    ns, vdm, pmd = served
    sock = _packet_socket(ns)
    _drops(sock)
    before = ns.link_stats(TAP)
    pmd.cmd("set fwd txonly")
    pmd.cmd("set txpkts " + ",".join(map(str, TXONLY_SEGS)))
    pmd.cmd("start")
    _wait_counter(ns, "rx_packets", before["rx_packets"] + 20000, timeout=60)
    stats = pmd.stop()
    sent = stats["tx_packets"]
    assert sent >= 20000, (stats, pmd.output[-3000:])
    # forwarding stopped but the port is up: vdm empties the ring (a frontend that stops the
    # device first may take back what it queued, and then the counts would not be comparable)
    got = _wait_counter(ns, "rx_packets", before["rx_packets"] + sent) - before["rx_packets"]
    after = ns.link_stats(TAP)
    assert got == sent, f"testpmd sent {sent} frames, the tap received {got}\n{vdm.output[-2000:]}"
    assert after["rx_bytes"] - before["rx_bytes"] == sent * TXONLY_LEN, (before, after, sent)
    assert after["rx_errors"] == before["rx_errors"] and after["rx_dropped"] == before["rx_dropped"]

    good, bad = 0, []
    while True:
        ready, _, _ = select.select([sock], [], [], 0.5)
        if not ready:
            break
        frame, addr = sock.recvfrom(65536)
        if addr[2] == PACKET_OUTGOING:
            continue
        problem = _txonly_frame_problem(frame)
        if problem:
            bad.append(problem)
        else:
            good += 1
    dropped = _drops(sock)
    assert not bad, f"{len(bad)} frames not testpmd's: {bad[:5]}"
    assert good + dropped == sent, (good, dropped, sent)
    assert good > sent // 2, (
        f"only {good} of {sent} frames could be read back ({dropped} dropped on the socket)"
    )
    print(
        f"DPDK virtio-user txonly -> vdm -> tap: {sent} frames of {TXONLY_LEN} bytes "
        f"({len(TXONLY_SEGS)} segments), {good} read back and checked, {dropped} not read"
    )


def _tap_frames(count: int) -> list[bytes]:
    """``count`` frames to testpmd's MAC, 60..1514 bytes, each payload unique (index + random)."""
    frames = []
    for i in range(count):
        size = 60 + (i * 397) % (1514 - 60 + 1)
        if i % 50 == 0:
            size = 1514
        body = struct.pack("!I", i) + os.urandom(size - 14 - 4)
        frames.append(eth(_mac(PMD_MAC), _mac("02:00:00:00:00:01"), ETH_P_TEST, body))
    return frames


@pytest.mark.parametrize("served", [256, 1024], indirect=True, ids=["ring256", "ring1024"])
def test_frames_written_into_the_tap_reach_testpmd_and_come_back_unchanged(served) -> None:
    ns, vdm, pmd = served
    count, window = 2048, 64
    frames = _tap_frames(count)
    sock = _packet_socket(ns)
    pmd.cmd("set fwd io")  # each received frame is sent back out of the same port, unchanged
    pmd.cmd("start")
    before = ns.link_stats(TAP)
    back: list[bytes] = []
    for at in range(0, count, window):
        for frame in frames[at : at + window]:
            sock.send(frame)
        deadline = time.monotonic() + 20
        while len(back) < at + window and time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.5)
            if ready:
                frame, addr = sock.recvfrom(65536)
                if addr[2] != PACKET_OUTGOING:
                    back.append(frame)
        assert len(back) == min(at + window, count), (
            f"{len(back)} of the first {at + window} frames came back\n"
            f"{pmd.output[-2000:]}\n{vdm.output[-2000:]}"
        )
    stats = pmd.stop()
    after = ns.link_stats(TAP)
    assert sorted(back) == sorted(frames), "the frames that came back differ from those sent"
    assert stats["rx_packets"] == count and stats["tx_packets"] == count, stats
    assert stats["rx_dropped"] == 0 and stats["tx_dropped"] == 0, stats
    sent_bytes = sum(map(len, frames))
    assert after["tx_packets"] - before["tx_packets"] == count, (before, after)
    assert after["tx_bytes"] - before["tx_bytes"] == sent_bytes, (before, after)
    assert after["rx_packets"] - before["rx_packets"] == count, (before, after)
    assert after["rx_bytes"] - before["rx_bytes"] == sent_bytes, (before, after)
    assert vdm.count(f"queue 0 starts: size {pmd.queue_size},") == 1, vdm.output
    port = pmd.cmd("show port stats 0", r"Tx-bps[^\n]*\n")
    m = re.search(r"RX-packets:\s+(\d+)\s+RX-missed:\s+(\d+)\s+RX-bytes:\s+(\d+)", port)
    assert m and int(m.group(1)) == count and int(m.group(3)) == sent_bytes, port
    print(f"tap -> vdm -> DPDK virtio-user (io) -> vdm -> tap: {count} frames, {sent_bytes} bytes, intact")


def test_kill_usr1_under_traffic_dumps_stacks_and_vdm_carries_on(served) -> None:
    """The README's promise for a vdm that seems stuck: ``kill -USR1`` prints the stacks, vdm carries on."""
    ns, vdm, pmd = served
    pmd.cmd("set fwd txonly")
    # the tap's counter is read BEFORE forwarding starts: read after ``start``, it already held the
    # frames that arrived while ``ip -s link`` ran (11-378 of them), and the count came out short
    before = ns.link_stats(TAP)["rx_packets"]
    pmd.cmd("start")
    signals = 60
    slowest = 0.0
    for i in range(signals):
        time.sleep(0.1)
        assert vdm.alive, f"vdm died after {i} SIGUSR1 (exit {vdm.proc.returncode}):\n{vdm.output[-1500:]}"
        # One signal at a time: the next goes only once this one's dump is out. A SIGUSR1 sent
        # while the last is still pending is merged with it (the kernel does not queue standard
        # signals, nor does Python its handler calls), and with testpmd and vdm busy on the two
        # cores a dump can take longer than the 0.1 s between signals: 59 of 60 dumps were seen.
        sent_at = time.monotonic()
        os.kill(vdm.proc.pid, signal.SIGUSR1)
        while vdm.count("Current thread") <= i and vdm.alive and time.monotonic() < sent_at + 10:
            time.sleep(0.005)
        slowest = max(slowest, time.monotonic() - sent_at)
        assert vdm.count("Current thread") == i + 1, f"SIGUSR1 {i + 1}: no stack dump\n{vdm.output[-1500:]}"
    stats = pmd.stop()
    got = _wait_counter(ns, "rx_packets", before + stats["tx_packets"]) - before
    assert vdm.alive, f"vdm died (exit {vdm.proc.returncode}):\n{vdm.output[-1500:]}"
    assert got == stats["tx_packets"], (got, before, stats, ns.link_stats(TAP))
    print(
        f"{signals} SIGUSR1 under txonly traffic: {signals} stack dumps (slowest {slowest:.3f} s), "
        f"{got} frames of {stats['tx_packets']} sent reached the tap"
    )
