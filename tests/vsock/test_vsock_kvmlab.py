"""vdm-vsock with a real Linux guest under ``vdm run`` in the KVM lab.

``vdm run --vsock cid=3,path=/mnt/tmp/v.sock``; next to vdm in the lab runs the host's half
(``tests/vsock/guestprog.py`` as a program): a slow reader serving ``/mnt/tmp/v.sock_1234`` and
a host program that reaches the guest's port 5678 through ``/mnt/tmp/v.sock`` with
``CONNECT 5678``. The guest kit's static ``vsock_test`` connects, then listens; 1 MiB goes each
way on each connection. The host's half prints one ``vsock-peer`` line per connection (what it
got compared with the guest's seeded stream, and the FNV-1a of what it sent back), which the
test matches with the guest's own line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

from tests.realguest.conftest import kit, qemu  # noqa: F401 - the session fixtures

from .guestprog import build, fnv, guest_spec, stream

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]

NBYTES = 1 << 20
PORT, LPORT = 1234, 5678
PEERS = Path(__file__).with_name("guestprog.py")


def peer_line(log: str, name: str) -> dict[str, str]:
    for line in log.splitlines():
        if line.startswith(f"vsock-peer {name} "):
            return dict(w.split("=", 1) for w in line.split()[2:])
    raise AssertionError(f"no 'vsock-peer {name}' line in the lab's output")


@LAB_GUEST_RERUN  # a lab guest now and then dies in early boot, before any device work
def test_guest_talks_both_ways_under_vdm_run(kit: vdm_lab.GuestKit, tmp_path) -> None:  # noqa: F811
    program = build(tmp_path)
    setup = f"{sys.executable} {PEERS} /mnt/tmp/v.sock {PORT} {LPORT} {NBYTES} &\nsleep 1"
    r = vdm_lab.run_vdm(["--vsock", "cid=3,path=/mnt/tmp/v.sock"], ["boot", "vsock"],
                        {"port": PORT, "lport": LPORT, "bytes": NBYTES}, kit=kit, guest=guest_spec(program),
                        where="kvmlab", setup=setup, timeout=900)
    r.assert_ok("boot", "vsock")
    res = r["vsock"]
    print(f"\nvsock under vdm run: {res.line}")
    c, lsn = peer_line(r.log, "connect"), peer_line(r.log, "listen")
    assert c["rx"] == str(NBYTES) and c["rx_ok"] == "1", r.describe()  # guest -> host, byte for byte
    assert lsn["rx"] == str(NBYTES) and lsn["rx_ok"] == "1", r.describe()
    assert res["c_tx_fnv"] == fnv(stream(7, NBYTES)), r.describe()
    assert res["c_rx"] == c["back"] and res["c_rx_fnv"] == c["back_fnv"], r.describe()  # host -> guest
    assert res["l_rx"] == lsn["back"] and res["l_rx_fnv"] == lsn["back_fnv"], r.describe()
    assert lsn["ok_line"].startswith("OK_"), r.describe()
    assert r.returncode == 0 and r.runner == "vdm run in the KVM lab", r.describe()
    assert "device marked broken" not in r.log, r.describe()
