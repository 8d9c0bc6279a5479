"""`--control` under `vdm dm-only` (the simulated Xen of vdm_xen.sim): the same control socket lists
the disk, counts what the guest's driver did, and a resize reaches the guest as the virtio-mmio
transport's config-change interrupt on the device's SPI (issue 16 items 3 and 4: one notification
path for vdm run and dm-only, the transport's)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from vdm.cli.ctl import request
from vdm.testing.driver import VirtioTestDriver

# skips this module where vdm-xen is not installed
from tests.xen.dm_only_setup import BASE, T_IN, GuestMmio, SimXen, blk_plugins, blk_spec, hdr, serving

MIB = 1 << 20
CONFIG_CHANGED = 2


def test_dm_only_control_socket_and_resize(tmp_path: Path) -> None:
    plugins = blk_plugins()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 * MIB)
    ctl = str(tmp_path / "vdm.ctl")
    sim = SimXen(nr_vcpus=2)
    try:
        with serving(sim, [blk_spec(plugins, image)], control=ctl):
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
        assert not os.path.exists(ctl), "the control socket is removed when dm-only ends"
    finally:
        sim.close()
