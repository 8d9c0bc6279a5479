"""An untrusted qcow2 image whose backing-file name points elsewhere on the host.

End to end through ``vdm vhost-user --disk`` (under strace, so every open(2) of the process and its
threads is seen) and through the blk plugin's create() (under a Python audit hook): the image names
/etc/shadow as its backing file, and vdm must refuse it with an error that says which file and how
to allow it -- without ever opening /etc/shadow. A backing file beside the image, or one allowed
explicitly with ``allow_backing=``, is opened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

SECRET = "/etc/shadow"


def _overlay(tmp_path, backing: str, name: str = "img.qcow2") -> str:
    img = str(tmp_path / name)
    # -u: qemu-img itself does not open the backing file (it need not exist or be readable)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", "-u", img, "1M"],
        check=True,
        cwd=str(tmp_path),
    )
    return img


def _vdm(*args: str) -> list[str]:
    return [sys.executable, "-m", "vdm.cli.main", *args]


@needs_qemu_img
@needs_strace
def test_vhost_user_refuses_a_backing_file_elsewhere_without_opening_it(tmp_path):
    img = _overlay(tmp_path, SECRET)
    trace = tmp_path / "trace"
    sock = str(tmp_path / "vu.sock")
    proc = subprocess.run(
        [
            "strace", "-f", "-qq", "-e", "trace=open,openat,openat2,creat", "-o", str(trace),
            *_vdm("vhost-user", "--socket-path", sock, "--disk", img),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    opened = trace.read_text()
    assert img in opened, "strace saw no open of the image: the trace is not showing opens"
    assert SECRET not in opened, "vdm opened the backing file named by an untrusted image"
    assert proc.returncode != 0, "vdm served an image whose backing file it was not allowed to open"
    err = proc.stderr
    assert "Traceback" not in err, f"a traceback instead of an error message:\n{err}"
    assert SECRET in err and "allow_backing" in err and "not beside the image" in err, err
    assert not os.path.exists(sock)


_AUDIT = textwrap.dedent(
    """
    import os, sys
    opened = []
    sys.addaudithook(lambda ev, a: opened.append(os.fsdecode(a[0]))
                     if ev == "open" and a and isinstance(a[0], (str, bytes)) else None)
    from vdm.errors import UserError
    from vdm.registry import DeviceContext
    from vdm_blk.backends import DiskError
    from vdm_blk.config import BlkConfig
    from vdm_blk.plugin import create
    cfg = BlkConfig(path=sys.argv[1], allow_backing=sys.argv[2] or None)
    try:
        dev = create(cfg, DeviceContext(vmm=None))
    except (DiskError, UserError) as e:
        print("REFUSED", e)
    else:
        print("OPENED", dev.backend.backing is not None)
        dev.close()
    print("FILES", "|".join(opened))
    """
)


def _create(img: str, allow: str = "") -> tuple[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", _AUDIT, img, allow], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    result = next(line for line in out.splitlines() if line.startswith(("REFUSED", "OPENED")))
    files = next(line for line in out.splitlines() if line.startswith("FILES "))[6:].split("|")
    return result, files


@needs_qemu_img
def test_blk_create_refuses_a_backing_file_elsewhere_without_opening_it(tmp_path):
    img = _overlay(tmp_path, SECRET)
    result, files = _create(img)
    assert result.startswith("REFUSED"), result
    assert SECRET in result and "allow_backing=" in result
    assert os.path.realpath(img) in map(os.path.realpath, files)
    assert SECRET not in files


@needs_qemu_img
def test_blk_create_also_refuses_a_relative_name_that_climbs_out(tmp_path):
    (tmp_path / "imgs").mkdir()
    img = _overlay(tmp_path / "imgs", "../../../../../../../../etc/shadow")
    result, files = _create(img)
    assert result.startswith("REFUSED"), result
    assert SECRET not in files


@needs_qemu_img
def test_a_backing_file_beside_the_image_or_allowed_explicitly_is_opened(tmp_path):
    beside = tmp_path / "base.raw"
    beside.write_bytes(os.urandom(1 << 20))
    result, files = _create(_overlay(tmp_path, "base.raw"))
    assert result == "OPENED True", result
    assert str(beside) in map(os.path.realpath, files)

    other = tmp_path / "elsewhere"
    other.mkdir()
    far = other / "base.raw"
    far.write_bytes(os.urandom(1 << 20))
    (tmp_path / "imgs").mkdir()
    img = _overlay(tmp_path / "imgs", str(far))
    refused, files = _create(img)
    assert refused.startswith("REFUSED") and str(far) not in files, refused
    result, files = _create(img, allow=str(far))
    assert result == "OPENED True", result
    assert str(far) in files
