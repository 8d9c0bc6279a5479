"""vdm-rng with a real Linux guest under ``vdm run`` in the KVM lab.

``vdm run --rng /mnt/tmp/pool.bin,rate=65536,period=50``: a 1 MiB file as the source, at most
3276 bytes per 50 ms window. The kit's ``rng`` workload reads 4 KiB from ``/dev/hwrng`` (more than
one window's quota, so the read completes only if held requests are served when their window
comes) and reports the kernel's current hwrng, which must be ``virtio_rng.0``: virtio-rng is the
guest's only hardware RNG under ``vdm run``. ``vdm run`` exits 0 when the guest reboots.
"""

from __future__ import annotations

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]


@LAB_GUEST_RERUN  # a lab guest now and then dies in early boot, before any device work
def test_guest_reads_hwrng_from_a_file_under_a_rate_limit(kit: vdm_lab.GuestKit) -> None:
    r = vdm_lab.run_vdm(
        ["--rng", "/mnt/tmp/pool.bin,rate=65536,period=50"],
        ["boot", "rng"],
        {"rngbytes": 4096},
        kit=kit,
        where="kvmlab",
        setup="dd if=/dev/urandom of=/mnt/tmp/pool.bin bs=1M count=1 2>/dev/null",
        timeout=900,
    )
    r.assert_ok("boot", "rng")
    res = r["rng"]
    assert res["rng"] == "virtio_rng.0", r.describe()
    assert res["bytes"] == "4096" and int(res["distinct"]) > 200, r.describe()
    assert r.returncode == 0 and r.runner == "vdm run in the KVM lab", r.describe()
    assert "device marked broken" not in r.log, r.describe()
