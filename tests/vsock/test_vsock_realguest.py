"""A real Linux guest talks to host Unix sockets through vdm-vsock served by ``vdm vhost-user``
(QEMU TCG's ``vhost-user-vsock-pci``; QEMU 7.2 and Debian 13's 10.0).

The guest's static test program (scripts/guestkit/vsock_test.c, built with the host's gcc)
connects to host port 1234 -- vdm dials ``PATH_1234``, where the test's slow reader serves --
then listens on port 5678, which the test reaches through ``PATH`` with ``CONNECT 5678``. Each
side sends 2 MiB, shuts its sending side and reads to the end; both sides compare what arrived
byte for byte (the host) or by FNV-1a (the guest). The slow reader makes the guest's writes wait
for credit; the backend's high-water RSS is printed (what vdm held stays bounded by the credit:
tests/vsock/test_vsock_device.py asserts it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vdm_lab

from tests.core.installed import clean_env
from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures

from .guestprog import HostPeers, build, guest_spec

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

NBYTES = 2 << 20
PORT, LPORT = 1234, 5678


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def test_guest_talks_both_ways_with_a_slow_host_reader(kit, qemu_frontend, tmp_path):  # noqa: F811
    fe = qemu_frontend
    program = build(tmp_path)
    sock, vpath = tmp_path / "vu.sock", str(tmp_path / "v.sock")
    with vdm_lab.VhostUserBackend(
        sock, "--vsock", f"cid=3,path={vpath}", env=clean_env(), start_timeout=30
    ) as backend:
        peers = HostPeers(vpath, PORT, LPORT, NBYTES).start()
        try:
            r = vdm_lab.run_qemu(
                vdm_lab.vhost_user_device_args("vhost-user-vsock-pci", sock),
                ["vsock"], {"port": PORT, "lport": LPORT, "bytes": NBYTES},
                timeout=600, kit=kit, qemu=fe, visible=[tmp_path], guest=guest_spec(program),
            )
            hwm = vm_hwm_kib(backend.proc.pid)
            assert not r.timed_out, f"{fe}\n{r.log[-3000:]}\n{backend.output[-2000:]}"
            r.assert_ok("vsock")
            peers.check(r["vsock"], NBYTES)
            print(f"{fe}: vsock {r['vsock'].line}; backend VmHWM {hwm} KiB")
            assert backend.alive, backend.output
            text = backend.output
            assert "ERROR" not in text and "Traceback" not in text, text
        finally:
            peers.close()
