"""libblkio 1.5 (Debian 13) as a second vhost-user frontend for vdm-blk, with no guest.

``scripts/frontends/blkio_frontend.c`` is a small C client on libblkio's ``virtio-blk-vhost-user``
driver, built by ``scripts/frontends/build.sh`` inside the Debian 13 root (``tests/realguest/
debian13.py``; libblkio is not in Debian 12) and run there with the socket's directory visible.
It writes a position-dependent pattern over a range (12 KiB requests, 16 in flight, so requests
straddle qcow2 clusters and the ring holds many chains), flushes, reads it back and compares,
zeroes the last quarter with WRITE_ZEROES and reads the zeros back, and discards the third
quarter. A second connection reads the pattern back with 4 KiB requests. Then the backend is
stopped and the host image itself is compared with what was written (a qcow2 is converted to raw
with ``qemu-img convert`` after a clean ``qemu-img check``).

Every case runs against ``vdm vhost-user --disk`` and against Debian 12's qemu-storage-daemon
(``--export vhost-user-blk``) on the same kind of image: the client is right when qsd agrees.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
from vdm_lab import debian13

from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "frontends" / "build.sh"

MIB = 1 << 20
DISK = 32 * MIB
#: the range the client writes: [OFFSET, OFFSET + SIZE), in quarters (pattern, pattern, discarded, zeroes)
OFFSET, SIZE = 1 * MIB, 12 * MIB
QUARTER = SIZE // 4
SEED = 7


class Client:
    """The built ``blkio_frontend``, run inside the Debian 13 root."""

    def __init__(self, root: debian13.Debian13Root, binary: Path) -> None:
        self.root = root
        self.binary = binary

    def run(self, sock: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binary), "--path", str(sock), *args]
        return self.root.run(argv, visible=[self.binary.parent, sock.parent], timeout=timeout)


@pytest.fixture(scope="module")
def client() -> Client:
    try:
        root = debian13.build()
    except debian13.Debian13Error as e:
        pytest.skip(f"libblkio lives in the Debian 13 root, which cannot be built here: {e}")
    p = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{BUILD} failed:\n{p.stdout}{p.stderr}"
    return Client(root, Path(p.stdout.strip().splitlines()[-1]))


def pattern(offset: int, size: int, seed: int) -> bytes:
    """What blkio_frontend writes over [offset, offset + size) (see the comment at its top)."""
    ramp = bytes(range(256)) * 3
    out = bytearray()
    for sector in range(offset // 512, (offset + size) // 512):
        base = (seed + sector * 31 + 16) & 0xFF
        out += struct.pack("<QQ", seed & (2**64 - 1), sector) + ramp[base : base + 496]
    return bytes(out)


def make_image(path: Path, fmt: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(DISK)], check=True)


class Qsd:
    """qemu-storage-daemon exporting ``image`` over vhost-user-blk on ``sock`` (the C peer)."""

    def __init__(self, image: Path, fmt: str, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,filename={image},node-name=f0,discard=unmap",
                "--blockdev", f"driver={fmt},file=f0,node-name=d0,discard=unmap",
                "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
                "writable=on",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.output}")
            time.sleep(0.05)
        self.output = ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output = out or ""
        return self.proc.returncode


def image_bytes(image: Path, fmt: str, tmp: Path) -> bytes:
    """The guest-visible contents of ``image``; a qcow2 must pass ``qemu-img check`` first."""
    if fmt == "raw":
        return image.read_bytes()
    chk = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert chk.returncode == 0, f"qemu-img check: {chk.stdout}{chk.stderr}"
    raw = tmp / "converted.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    return raw.read_bytes()


def _lines(p: subprocess.CompletedProcess[str]) -> str:
    return f"exit {p.returncode}\n{p.stdout}{p.stderr}"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("backend", ["vdm", "qemu-storage-daemon"])
def test_written_data_reads_back_and_lands_in_the_image(
    client: Client, tmp_path: Path, backend: str, fmt: str
) -> None:
    image = tmp_path / f"disk.{fmt}"
    make_image(image, fmt)
    sock = tmp_path / "blk.sock"
    vdm = qsd = None
    if backend == "vdm":
        vdm = VdmProcess(str(sock), "--disk", str(image))
    else:
        qsd = Qsd(image, fmt, sock)
    try:
        first = client.run(
            sock, "--mode", "verify", "--offset", str(OFFSET), "--size", str(SIZE), "--bs", "12k",
            "--qd", "16", "--seed", str(SEED), "--write-zeroes", "--discard",
        )  # fmt: skip
        assert first.returncode == 0, _lines(first) + (vdm.output if vdm else "")
        assert f"VERIFY ok pattern offset={OFFSET} size={SIZE}" in first.stdout, _lines(first)
        assert f"VERIFY ok zeroes offset={OFFSET + 3 * QUARTER} size={QUARTER}" in first.stdout, _lines(first)
        assert "DISCARD ok" in first.stdout, _lines(first)
        # a second connection, other request shapes: the first half is still the pattern
        again = client.run(
            sock, "--mode", "check", "--offset", str(OFFSET), "--size", str(2 * QUARTER), "--bs", "4k",
            "--qd", "4", "--seed", str(SEED),
        )  # fmt: skip
        assert again.returncode == 0 and "VERIFY ok pattern" in again.stdout, _lines(again)
        m = re.search(r"capacity=(\d+)", first.stdout)
        assert m and int(m.group(1)) == DISK, _lines(first)
    finally:
        rc = vdm.stop() if vdm else qsd.stop()  # type: ignore[union-attr]
    assert rc == 0, vdm.output if vdm else qsd.output  # type: ignore[union-attr]
    if vdm:
        assert vdm.count("closing the connection") == 0, vdm.output
        assert vdm.count("frontend connected") == 2, vdm.output
    data = image_bytes(image, fmt, tmp_path)
    assert len(data) == DISK
    assert data[:OFFSET] == bytes(OFFSET), "written before the range"
    want = pattern(OFFSET, 2 * QUARTER, SEED)
    assert data[OFFSET : OFFSET + 2 * QUARTER] == want, "the pattern is not in the image"
    zeroes_at = OFFSET + 3 * QUARTER
    assert data[zeroes_at : zeroes_at + QUARTER] == bytes(QUARTER), "WRITE_ZEROES did not reach the image"
    assert data[OFFSET + SIZE :] == bytes(DISK - OFFSET - SIZE), "written after the range"


@pytest.mark.parametrize("queue_size", [1024, 32768])
def test_queue_sizes_above_256_carry_that_many_requests(
    client: Client, tmp_path: Path, queue_size: int
) -> None:
    """libblkio asks for the ring size it is given (QEMU 10 too): up to the split ring's 32768."""
    image = tmp_path / "disk.raw"
    make_image(image, "raw")
    sock = tmp_path / "blk.sock"
    vdm = VdmProcess(str(sock), "--disk", str(image))
    try:
        p = client.run(
            sock, "--mode", "verify", "--size", "8M", "--bs", "4k", "--qd", "512",
            "--queue-size", str(queue_size), "--seed", "3",
        )  # fmt: skip
    finally:
        rc = vdm.stop()
    assert p.returncode == 0 and "VERIFY ok pattern offset=0 size=8388608" in p.stdout, _lines(p) + vdm.output
    assert vdm.count(f"queue 0 starts: size {queue_size},") == 1, vdm.output
    assert rc == 0 and vdm.count("closing the connection") == 0, vdm.output
    assert image.read_bytes()[: 8 * MIB] == pattern(0, 8 * MIB, 3)


@pytest.mark.parametrize("mode", ["randread", "randwrite", "read", "write"])
def test_benchmark_modes_complete_every_request(client: Client, tmp_path: Path, mode: str) -> None:
    """The modes benchmarks/vhost_user_blk_free.py uses: a fixed count completes, with a RESULT line."""
    image = tmp_path / "disk.raw"
    make_image(image, "raw")
    sock = tmp_path / "blk.sock"
    vdm = VdmProcess(str(sock), "--disk", str(image))
    try:
        p = client.run(sock, "--mode", mode, "--bs", "4k", "--qd", "32", "--size", "8M", "--count", "3000")
    finally:
        rc = vdm.stop()
    assert p.returncode == 0, _lines(p) + vdm.output
    result = (
        r"^RESULT mode=(\w+) bs=4096 qd=32 ios=(\d+) .*iops=(\d+) .*p50_us=([\d.]+) p99_us=([\d.]+) errors=0$"
    )
    m = re.search(result, p.stdout, re.M)
    assert m and m.group(1) == mode and int(m.group(2)) == 3000, _lines(p)
    assert float(m.group(4)) <= float(m.group(5)), _lines(p)
    assert rc == 0 and vdm.count("closing the connection") == 0, vdm.output


def test_a_range_past_the_disk_is_refused_with_one_line(client: Client, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, "raw")
    sock = tmp_path / "blk.sock"
    vdm = VdmProcess(str(sock), "--disk", str(image))
    try:
        p = client.run(sock, "--mode", "verify", "--offset", str(DISK - MIB), "--size", str(2 * MIB))
    finally:
        vdm.stop()
    assert p.returncode == 2, _lines(p)
    assert p.stdout.splitlines()[-1].startswith("ERROR range: offset"), _lines(p)
