"""vdm-rng under ``vdm dm-only`` against the simulated Xen (vdm_xen.sim): libxl's generic virtio
device ``virtio,device4`` finds vdm-rng by its virtio id, ``--device rng,OPTIONS`` configures it
(a file source, a rate limit), and the guest's requests, made through ioreqs on the virtio-mmio
window, are answered from the file in order; a window's quota is honoured (the second request of a
window waits for the waker, which needs no guest exit to serve it)."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import pytest
from vdm.plugins import load_plugins
from vdm.testing.driver import VirtioTestDriver
from vdm_xen import dm_only
from vdm_xen.sim import SimXen

from tests.xen.dm_only_setup import BASE, GuestMmio


@pytest.fixture(scope="module")
def plugins():
    p = load_plugins(only=["virtio-rng"])
    if "rng" not in p.devices:
        pytest.skip("vdm-rng is not installed (scripts/install.sh)")
    assert p.devices["rng"][0].virtio_id == 4
    return p


def test_dm_only_serves_vdm_rng_by_virtio_id(plugins, tmp_path: Path) -> None:
    pool = os.urandom(4096)
    (tmp_path / "pool.bin").write_bytes(pool)
    sim = SimXen(nr_vcpus=2)
    errors: list[BaseException] = []
    got: list[bytes] = []
    try:
        be = sim.libxl_add_virtio(0, "virtio,device4", base=BASE, irq=33)

        def work() -> None:
            try:
                sim.wait_xs(f"{be}/state", "2")
                drv = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, BASE))  # type: ignore[arg-type]
                assert drv.reg_read(0x008) == 4
                drv.init(queues=[0])
                # 64 bytes per 200 ms window: the second request waits for the next window
                for _ in range(3):
                    u = drv.request(0, [], [64], timeout=20)
                    got.append(u.data[: u.written])
            except BaseException as e:
                errors.append(e)
            finally:
                sim.destroy_domain()

        t = threading.Thread(target=work, daemon=True)
        t.start()
        args = argparse.Namespace(
            plugin_set=plugins, domid=None, irq_kind="spi", wait_timeout=20,
            device=[f"rng,source={tmp_path / 'pool.bin'},rate=320,period=200"],
        )
        assert dm_only.run(args, lib=sim.lib()) == 0
        t.join(30)
        assert not errors, errors
        assert b"".join(got) == pool[:192]  # the file's bytes, in order, 64 per request
        assert [v for p, v in sim.xs_writes if p == f"{be}/state"] == ["1", "2", "6"]
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()
