"""What the real-guest rng tests share: an rng device served by ``vdm vhost-user`` from the test's
tmp directory, and a QEMU TCG guest (the kit's ``rng`` workload) reading ``/dev/hwrng`` from it.

``tests/rng/test_rng_realguest.py`` serves vdm-rng (the plugin), ``tests/examples/
test_rng_realguest.py`` the example plugin from a venv it is installed in; what the guest must see
is the same: the kernel's hwrng is the virtio device, the bytes asked for arrive, they look random,
and the backend is still serving afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

import vdm_lab

from tests.core.installed import clean_env


@contextlib.contextmanager
def vhost_user_backend(
    python: str | Path, device: Sequence[str], tmp_path: Path
) -> Iterator[tuple[Path, subprocess.Popen, Path]]:
    """``python -m vdm.cli.main vhost-user -s SOCKET *device`` in ``tmp_path``, stopped on exit;
    yields (socket, process, log path)."""
    sock = tmp_path / "rng.sock"
    log = open(tmp_path / "backend.log", "w+")  # closed below
    proc = subprocess.Popen(
        [str(python), "-m", "vdm.cli.main", "vhost-user", "-s", str(sock), *device],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "the vhost-user backend never listened"
            time.sleep(0.05)
        yield sock, proc, Path(log.name)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def guest_reads_hwrng(
    kit: vdm_lab.GuestKit,
    fe: vdm_lab.QemuFrontend,
    backend: tuple[Path, subprocess.Popen, Path],
    nbytes: int,
) -> None:
    """Boot the kit under ``fe`` with a vhost-user-rng-pci device on the backend's socket; the
    guest reads ``nbytes`` from /dev/hwrng. Asserts what the guest and the backend's log show."""
    sock, proc, log = backend
    r = vdm_lab.run_qemu(
        vdm_lab.vhost_user_device_args("vhost-user-rng-pci", sock),
        ["rng"],
        {"rngbytes": nbytes},
        timeout=300,
        kit=kit,
        qemu=fe,
        visible=[sock.parent],
    )
    assert not r.timed_out, f"{fe}\n{r.log[-3000:]}"
    r.assert_ok("rng")
    res = r["rng"]
    assert res["rng"] == "virtio_rng.0", f"{fe}: {res.line}"  # the kernel's hwrng is vdm's device
    assert res["bytes"] == str(nbytes), f"{fe}: {res.line}"
    assert int(res["distinct"]) > 200, f"{fe}: {res.line}"  # 4 KiB of random bytes use nearly all 256 values
    assert proc.poll() is None, f"{fe}\n{log.read_text()}"  # the backend is still serving
    text = log.read_text()
    assert "serving rng on" in text and "ERROR" not in text, text
