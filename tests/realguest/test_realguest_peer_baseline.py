"""The peer baseline: the guest kit on QEMU's own virtio devices (QEMU TCG).

These are the reference runs vdm's real-guest tests are compared against, and they prove the kit
and the harness: when one fails, the fault is in the kit, the harness or QEMU, not in vdm.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import vdm_lab

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

EXT2_MAGIC_OFFSET = 1024 + 56  # superblock at 1024, s_magic at 56
EXT2_MAGIC = 0xEF53


def _md5_head(path: Path, length: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        h.update(f.read(length))
    return h.hexdigest()


def _image(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    return path


def test_peer_baseline_virtio_blk_pci_blk_and_fs(kit: vdm_lab.GuestKit, tmp_path: Path) -> None:
    """blk writes random data that the host finds in its image; fs builds a checked ext2."""
    raw = _image(tmp_path / "raw.img", 32)
    fsimg = _image(tmp_path / "fs.img", 32)
    r = vdm_lab.run_qemu(
        vdm_lab.virtio_blk_args(raw, 0) + vdm_lab.virtio_blk_args(fsimg, 1),
        ["blk", "fs"],
        {"mib": 8, "dev": "/dev/vda", "fsdev": "/dev/vdb", "fsmib": 4, "fsfiles": 32},
        timeout=180,
        kit=kit,
    )
    r.assert_ok("blk", "fs")
    assert r.returncode == 0, r.describe()  # -no-reboot: the guest's reboot ends QEMU cleanly
    assert r.done
    blk = r["blk"]
    assert blk["readback"] == "match"
    assert blk["md5"] == _md5_head(raw, 8 << 20), "the image does not hold what the guest wrote"
    fs = r["fs"]
    assert fs["fsck_rc"] == "0" and fs["verify_rc"] == "0"
    assert fs["files"] == "33"  # one big file and 32 small ones came back
    with open(fsimg, "rb") as f:
        f.seek(EXT2_MAGIC_OFFSET)
        assert struct.unpack("<H", f.read(2))[0] == EXT2_MAGIC, "no ext2 superblock in the host image"
    e2fsck = shutil.which("e2fsck") or shutil.which("fsck.ext2")
    if e2fsck:  # the host's own fsck agrees that the file system is clean
        p = subprocess.run([e2fsck, "-fn", str(fsimg)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


def test_peer_baseline_vhost_user_blk(kit: vdm_lab.GuestKit, tmp_path: Path) -> None:
    """vhost-user-blk with qemu-storage-daemon (the C backend vdm-vhost-user is compared with)."""
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        if os.environ.get("CI") or os.environ.get("VDM_REALGUEST_REQUIRED"):
            pytest.fail("qemu-storage-daemon is missing (package qemu-system-common)")
        pytest.skip("qemu-storage-daemon is missing (package qemu-system-common)")
    raw = _image(tmp_path / "vu.img", 32)
    sock = tmp_path / "vub.sock"
    daemon = subprocess.Popen(
        [qsd, "--blockdev", f"driver=file,node-name=f,filename={raw},cache.direct=on,aio=native",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), f"qemu-storage-daemon did not listen: {daemon.poll()}"
        r = vdm_lab.run_qemu(vdm_lab.vhost_user_blk_args(sock), ["blk"], {"mib": 8}, timeout=180, kit=kit)
    finally:
        daemon.terminate()
        daemon.wait(10)
    assert "memory-backend=mem" in " ".join(r.command)  # vhost-user got shared guest RAM
    r.assert_ok("blk")
    assert r["blk"]["md5"] == _md5_head(raw, 8 << 20)


class _TcpPeer:
    """A host TCP server for the guest's ``nettcp both``: sends a payload, then receives one."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.error: BaseException | None = None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.sock.settimeout(120)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.sendall(self.payload)
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(60)
                chunks = []
                while True:
                    d = conn.recv(1 << 16)
                    if not d:
                        break
                    chunks.append(d)
                self.received = b"".join(chunks)
        except BaseException as e:
            self.error = e
        finally:
            self.sock.close()


class _ConsoleEcho:
    """Connects to QEMU's virtconsole socket and echoes every byte back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.path))
                break
            except OSError:
                time.sleep(0.05)
        else:
            return
        with s:
            while True:
                try:
                    d = s.recv(4096)
                except OSError:
                    return
                if not d:
                    return
                s.sendall(d)


def test_peer_baseline_net_console_rng_smp_serial(kit: vdm_lab.GuestKit, tmp_path: Path) -> None:
    """virtio-net (user net: ping + TCP both ways), virtio-console echo, virtio-rng, 2 CPUs, ttyS0."""
    payload = os.urandom(1 << 20)
    peer = _TcpPeer(payload)
    hvc = tmp_path / "hvc.sock"
    _ConsoleEcho(hvc)
    extra = [
        *vdm_lab.user_net_args(),
        "-device", "virtio-rng-pci",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=hvc0,path={hvc},server=on,wait=off",
        "-device", "virtconsole,chardev=hvc0",
    ]
    r = vdm_lab.run_qemu(
        extra,
        ["smp", "serial", "rng", "console", "net", "nettcp"],
        {"cpus": 2, "peer": f"10.0.2.2:{peer.port}", "tcp": "both", "tcpmib": 1, "count": 3},
        timeout=180,
        kit=kit,
        cpus=2,
    )
    peer.thread.join(10)
    r.assert_ok("smp", "serial", "rng", "console", "net", "nettcp")
    assert r["smp"]["cpus"] == "2"
    assert f"VDMTEST SERIAL-TOKEN {r['serial']['token']}" in r.log
    assert r["rng"]["rng"].startswith("virtio_rng"), r["rng"].line
    assert int(r["rng"]["distinct"]) > 200  # 4096 random bytes show nearly every byte value
    assert r["net"]["rx"] == "3/3"
    tcp = r["nettcp"]
    assert peer.error is None, peer.error
    assert tcp["rx_bytes"] == str(len(payload)) and tcp["rx_md5"] == hashlib.md5(payload).hexdigest()
    assert tcp["tx_bytes"] == str(len(peer.received)) == str(1 << 20)
    assert tcp["tx_md5"] == hashlib.md5(peer.received).hexdigest()
