"""A real Linux guest reads /dev/hwrng from the example plugin's device.

The installed example (``vdm-rng-example``) is served by ``vdm vhost-user --rng-example ""``; QEMU (TCG)
boots the guest kit with a ``vhost-user-rng-pci`` device on that socket, and the kit's ``rng``
workload reads 4 KiB from ``/dev/hwrng`` and reports which hardware RNG the kernel used. No KVM
needed: the device is reached over vhost-user.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import vdm_lab

from tests.core.installed import clean_env
from tests.examples.rng_install import install_rng_example
from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures

pytestmark = [pytest.mark.realguest, pytest.mark.slow]


@pytest.fixture
def rng_backend(tmp_path):
    """``vdm vhost-user --rng-example ""`` from a venv where the example is installed; yields the socket."""
    python = install_rng_example(tmp_path)
    sock = tmp_path / "rng.sock"
    log = open(tmp_path / "backend.log", "w+")  # closed below
    proc = subprocess.Popen(
        [str(python), "-m", "vdm.cli.main", "vhost-user", "-s", str(sock), "--rng-example", ""],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True,
    )
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


def test_guest_reads_hwrng_from_the_example_device(kit, qemu_frontend, rng_backend):  # noqa: F811
    """Under QEMU 7.2 (the host's) and 10.0 (Debian 13's); the id and the messages name which."""
    fe = qemu_frontend
    sock, proc, log = rng_backend
    r = vdm_lab.run_qemu(
        ["-chardev", f"socket,id=rng0,path={sock}", "-device", "vhost-user-rng-pci,chardev=rng0"],
        ["rng"],
        {"rngbytes": 4096},
        timeout=300,
        kit=kit,
        qemu=fe,
        visible=[sock.parent],
    )
    assert not r.timed_out, f"{fe}\n{r.log[-3000:]}"
    r.assert_ok("rng")
    res = r["rng"]
    assert res["rng"] == "virtio_rng.0", f"{fe}: {res.line}"  # the kernel's hwrng is our device
    assert res["bytes"] == "4096", f"{fe}: {res.line}"
    assert int(res["distinct"]) > 200, f"{fe}: {res.line}"  # 4 KiB of random bytes use nearly all 256 values
    assert proc.poll() is None, f"{fe}\n{log.read_text()}"  # the backend is still serving
    assert "serving rng on" in log.read_text()
