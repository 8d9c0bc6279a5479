"""`--control` under `vdm dm-only` (the simulated Xen of vdm_xen.sim): the same control socket lists
the disk, counts what the guest's driver did, and a resize reaches the guest as the virtio-mmio
transport's config-change interrupt on the device's SPI (issue 16 items 3 and 4: one notification
path for vdm run and dm-only, the transport's)."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from vdm.cli.ctl import request
from vdm.plugins import load_plugins
from vdm.testing.driver import VirtioTestDriver

from tests.xen.test_dm_only import BASE, T_IN, GuestMmio, hdr

sim_mod = pytest.importorskip("vdm_xen.sim", reason="vdm-xen is not installed")
dm_only = pytest.importorskip("vdm_xen.dm_only", reason="vdm-xen is not installed")

MIB = 1 << 20
CONFIG_CHANGED = 2


def test_dm_only_control_socket_and_resize(tmp_path: Path) -> None:
    plugins = load_plugins(only=["blk"])
    if "blk" not in plugins.devices:
        pytest.skip("vdm-blk is not installed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 * MIB)
    ctl = str(tmp_path / "vdm.ctl")
    sim = sim_mod.SimXen(nr_vcpus=2)
    try:
        devices = {n: dt for n, (dt, _) in plugins.devices.items()}
        spec = dm_only.parse_device(f"blk,path={image},base={BASE:#x},irq=33", devices)
        r, w = os.pipe()
        ready = threading.Event()
        out: dict[str, Any] = {}

        def dm() -> None:
            try:
                out["why"] = dm_only.serve(
                    sim.lib(),
                    sim.domid,
                    [spec],
                    r,
                    irq_kind="spi",
                    on_ready=lambda vmm: ready.set(),
                    control=ctl,
                )
            except BaseException as e:
                out["error"] = e
                ready.set()

        t = threading.Thread(target=dm)
        t.start()
        try:
            assert ready.wait(10) and "error" not in out, out
            drv = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, BASE))  # type: ignore[arg-type]
            drv.init(queues=[0])
            for sector in range(4):
                assert drv.request(0, [hdr(T_IN, sector)], [512, 1], timeout=20).data[-1] == 0
            (dev,) = request(ctl, "list")["devices"]
            assert (dev["id"], dev["running"], "DRIVER_OK" in dev["status_names"]) == ("blk0", True, True)
            q = request(ctl, "stats")["devices"][0]["queues"][0]
            assert (q["requests"], q["completed"], q["bytes_read"], q["bytes_written"]) == (4, 4, 64, 4 * 513)

            drv.ack_interrupts()
            raised = sim.irq_log.count(("spi", 33, 1))
            assert request(ctl, "resize", {"device": "blk0", "size": 2 * MIB})["size"] == 2 * MIB
            assert struct.unpack("<Q", drv.config_bytes(0, 8))[0] == 4096
            assert drv.ack_interrupts() & CONFIG_CHANGED
            sim.wait_irq(lambda log: log.count(("spi", 33, 1)) > raised)  # the config change's SPI
        finally:
            os.write(w, b"x")
            t.join(20)
        assert out.get("why") == "stopped by signal", out
        assert not os.path.exists(ctl), "the control socket is removed when dm-only ends"
        os.close(r)
        os.close(w)
    finally:
        sim.close()
