"""A real Linux guest reads /dev/hwrng from vdm-rng served by ``vdm vhost-user`` (QEMU TCG).

``vdm vhost-user --rng rate=...,period=...`` (this checkout's vdm-rng, /dev/urandom, rate-limited)
serves a socket; QEMU boots the guest kit with a ``vhost-user-rng-pci`` device on it, and the kit's
``rng`` workload reads from ``/dev/hwrng`` and reports which hardware RNG the kernel bound. Under
the host's QEMU 7.2 and Debian 13's QEMU 10.0. The guest reads more than one window's quota, so
its read completes only if held requests are served when their window comes (nothing here times
it). No KVM needed: the device is reached over vhost-user.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import vdm_lab

from tests.core.installed import clean_env
from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

#: the limit served: 8 KiB/s in 100 ms windows (819 bytes each); the guest reads 4 KiB
RATE, PERIOD, READ = 8192, 100, 4096


@pytest.fixture
def rng_backend(tmp_path):
    """``vdm vhost-user --rng rate=RATE,period=PERIOD``; yields (socket, process, log path)."""
    sock = tmp_path / "rng.sock"
    log = open(tmp_path / "backend.log", "w+")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdm.cli.main", "vhost-user", "-s", str(sock),
         "--rng", f"rate={RATE},period={PERIOD}"],
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


def test_guest_reads_hwrng_through_the_rate_limit(kit, qemu_frontend, rng_backend):  # noqa: F811
    fe = qemu_frontend
    sock, proc, log = rng_backend
    r = vdm_lab.run_qemu(
        vdm_lab.vhost_user_device_args("vhost-user-rng-pci", sock),
        ["rng"],
        {"rngbytes": READ},
        timeout=300,
        kit=kit,
        qemu=fe,
        visible=[sock.parent],
    )
    assert not r.timed_out, f"{fe}\n{r.log[-3000:]}"
    r.assert_ok("rng")
    res = r["rng"]
    assert res["rng"] == "virtio_rng.0", f"{fe}: {res.line}"  # the kernel's hwrng is vdm-rng
    assert res["bytes"] == str(READ), f"{fe}: {res.line}"
    assert int(res["distinct"]) > 200, f"{fe}: {res.line}"
    assert proc.poll() is None, f"{fe}\n{log.read_text()}"  # the backend is still serving
    text = log.read_text()
    assert "serving rng on" in text and "ERROR" not in text, text
