"""What is not a regular file or a block device is refused at once, never opened blocking
(issue 20 item 10): a FIFO as the disk hung ``vdm vhost-user`` until a signal, and so did a FIFO
named as a backing file. A backing file naming the image itself gets its own message.

Everything runs in a child process with a timeout, so that a hang fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from .helpers import create_qcow2, needs_qemu_img, qemu_img

TIMEOUT = 30

_OPEN = textwrap.dedent(
    """
    import sys
    from vdm_blk.backends import DiskError, open_disk
    try:
        open_disk(sys.argv[1], format=sys.argv[2], read_only=sys.argv[3] == "ro").close()
    except DiskError as e:
        print("REFUSED", e)
    else:
        print("OPENED")
    """
)


def _open(path: str, fmt: str = "auto", ro: bool = False) -> str:
    p = subprocess.run(
        [sys.executable, "-c", _OPEN, path, fmt, "ro" if ro else "rw"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    return p.stdout.strip()


def test_a_fifo_as_the_disk_is_refused_at_once(tmp_path):
    fifo = str(tmp_path / "disk")
    os.mkfifo(fifo)
    for fmt in ("auto", "raw", "qcow2"):
        for ro in (False, True):
            out = _open(fifo, fmt, ro)
            assert out.startswith("REFUSED") and "not a regular file or a block device" in out, (fmt, ro, out)
            assert out.count("\n") == 0


def test_vdm_vhost_user_with_a_fifo_disk_exits_with_one_line(tmp_path):
    fifo = str(tmp_path / "disk")
    os.mkfifo(fifo)
    sock = tmp_path / "vu.sock"
    p = subprocess.run(
        [sys.executable, "-m", "vdm.cli.main", "vhost-user", "--socket-path", str(sock), "--disk", fifo],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fifo in lines[0] and "not a regular file or a block device" in lines[0], lines
    assert not sock.exists()


@needs_qemu_img
def test_a_fifo_as_the_backing_file_is_refused_at_once(tmp_path):
    os.mkfifo(str(tmp_path / "base.raw"))
    img = str(tmp_path / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-u", img, "1M")
    for ro in (False, True):
        out = _open(img, "qcow2", ro)
        assert out.startswith("REFUSED") and "base.raw" in out, out
        assert "not a regular file or a block device" in out, out


@needs_qemu_img
def test_a_backing_file_naming_the_image_itself_is_refused_as_such(tmp_path):
    img = create_qcow2(str(tmp_path / "img.qcow2"), 1 << 20)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", img)
    for ro in (False, True):
        out = _open(img, "qcow2", ro)
        assert out.startswith("REFUSED"), out
        assert "in use by another process" not in out, out
        assert "the image itself" in out, out


@needs_qemu_img
def test_a_backing_chain_that_loops_is_refused_as_such(tmp_path):
    a = create_qcow2(str(tmp_path / "a.qcow2"), 1 << 20)
    b = create_qcow2(str(tmp_path / "b.qcow2"), 1 << 20)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    out = _open(a, "qcow2", True)
    assert out.startswith("REFUSED") and "loop" in out and "in use by another process" not in out, out
