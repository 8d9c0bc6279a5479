"""``vdm dm-only`` and Xen 4.18+ libxl's generic virtio devices (``virtio = [ "type=virtio,device<ID>,
transport=mmio, ..." ]``, xenstore ``backend/virtio/<guest>/<devid>``), against the simulated Xen:
each device's virtio id finds the installed plugin that provides it (blk 2, console 3, the rng
example's 4 -- a plugin vdm-xen has never heard of), its configuration comes from ``--device TYPE,
OPTIONS`` (libxl carries none); an id no plugin provides is closed at once with one log line while
the others are served. The 4.17 ``virtio_disk`` layout is covered in test_dm_only.py."""

from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vdm.errors import UserError
from vdm.plugins import load_plugins
from vdm.registry import DeviceType
from vdm.testing.driver import VirtioTestDriver
from vdm_xen import dm_only
from vdm_xen.sim import SimXen

from .test_dm_only import BASE, GuestMmio, exercise_disk

REPO = Path(__file__).resolve().parents[2]
VIRTIO_BE = "/local/domain/0/backend/virtio/1"


def _rng_example() -> DeviceType:
    """The rng example's device type, registered the way vdm would load it (it need not be installed)."""
    sys.path.insert(0, str(REPO / "examples" / "rng" / "src"))
    try:
        from vdm_rng import plugin
    finally:
        sys.path.remove(str(REPO / "examples" / "rng" / "src"))
    found: list[DeviceType] = []
    plugin.vdm_register_devices(found.append)
    return found[0]


@pytest.fixture(scope="module")
def devices() -> Any:
    p = load_plugins(only=["blk", "console"])
    if "blk" not in p.devices or "console" not in p.devices:
        pytest.skip("vdm-blk and vdm-console are needed")
    out = {name: pair for name, pair in p.devices.items()}
    out["rng"] = (_rng_example(), None)
    return SimpleNamespace(devices=out)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def _args(plugins: Any, **kw: Any) -> argparse.Namespace:
    ns = argparse.Namespace(plugin_set=plugins, domid=None, device=[], irq_kind="spi", wait_timeout=20)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def _run_with_guest(sim: SimXen, args: argparse.Namespace, work: Any) -> int:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            work()
        except BaseException as e:
            errors.append(e)
        finally:
            sim.destroy_domain()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    rc = dm_only.run(args, lib=sim.lib())
    t.join(30)
    assert not errors, errors
    return rc


def _states(sim: SimXen, be: str) -> list[str]:
    return [v for p, v in sim.xs_writes if p == f"{be}/state"]


def test_generic_blk_console_and_rng_each_find_their_plugin(
    devices: Any, image: Path, tmp_path: Path
) -> None:
    sim = SimXen(nr_vcpus=2)
    out = tmp_path / "console.out"
    try:
        be_blk = sim.libxl_add_virtio(0, "virtio,device2", base=BASE, irq=33)
        be_con = sim.libxl_add_virtio(1, "virtio,device3", base=BASE + 0x200, irq=34)
        be_rng = sim.libxl_add_virtio(2, "virtio,device4", base=BASE + 0x400, irq=35)

        def work() -> None:
            for be in (be_blk, be_con, be_rng):
                sim.wait_xs(f"{be}/state", "2")
            exercise_disk(sim, image, BASE)
            # the console: port 0's transmit queue (1) carries what the guest's hvc0 writes
            con = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, BASE + 0x200))  # type: ignore[arg-type]
            assert con.reg_read(0x008) == 3
            con.init(queues=[0, 1])
            con.request(1, [b"hello from domU\n"], [], timeout=20)
            # the rng: 64 bytes of randomness into a device-writable buffer
            rng = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, BASE + 0x400))  # type: ignore[arg-type]
            assert rng.reg_read(0x008) == 4
            rng.init(queues=[0])
            got = rng.request(0, [], [64], timeout=20)
            assert len(got.data) == 64 and got.data != bytes(64)
            deadline = time.monotonic() + 10
            while b"hello from domU" not in (out.read_bytes() if out.exists() else b""):
                assert time.monotonic() < deadline, "console output never reached the backend"
                time.sleep(0.02)

        args = _args(devices, device=[f"blk,path={image}", f"console,backend=file:{out}"])
        assert _run_with_guest(sim, args, work) == 0
        for be in (be_blk, be_con, be_rng):
            assert _states(sim, be) == ["1", "2", "6"], be
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_a_device_id_no_plugin_provides_is_closed_with_one_line(
    devices: Any, image: Path, caplog: Any
) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        be_i2c = sim.libxl_add_virtio(0, "virtio,device22", base=BASE, irq=33)  # virtio-i2c: 34
        be_blk = sim.libxl_add_virtio(1, "virtio,device2", base=BASE + 0x200, irq=34)

        def work() -> None:
            sim.wait_xs(f"{be_i2c}/state", "6")  # closed: nothing waits for it
            sim.wait_xs(f"{be_blk}/state", "2")
            exercise_disk(sim, image, BASE + 0x200)

        with caplog.at_level(logging.INFO):
            assert _run_with_guest(sim, _args(devices, device=[f"blk,path={image}"]), work) == 0
        assert _states(sim, be_i2c) == ["1", "6"]
        lines = [r.getMessage() for r in caplog.records if "virtio,device22" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "virtio device id 34" in lines[0] and "no installed plugin" in lines[0]
        assert [list(s.mmio) for s in sim.servers.values()] in ([], [[]])  # all released
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


@pytest.mark.parametrize("vtype", ["virtio,device22", "virtio,devicezz", "virtio,device0", "i2c"])
def test_nothing_to_serve_is_one_error_and_every_device_closed(devices: Any, vtype: str) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        be = sim.libxl_add_virtio(0, vtype, base=BASE, irq=33)
        with pytest.raises(UserError, match="nothing to serve"):
            dm_only.run(_args(devices), lib=sim.lib())
        assert _states(sim, be) == ["1", "6"]
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_generic_blk_without_an_image_is_closed_and_says_how(devices: Any, caplog: Any) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        be = sim.libxl_add_virtio(0, "virtio,device2", base=BASE, irq=33)
        with caplog.at_level(logging.INFO), pytest.raises(UserError, match="nothing to serve"):
            dm_only.run(_args(devices), lib=sim.lib())
        assert _states(sim, be) == ["1", "6"]
        text = " ".join(r.getMessage() for r in caplog.records)
        assert "missing option path" in text and "--device blk," in text
    finally:
        sim.close()


def test_command_line_devices_match_xenstore_devices_of_their_type_in_order(
    devices: Any, tmp_path: Path
) -> None:
    sim = SimXen(nr_vcpus=1)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"A" * 4096)
    b.write_bytes(b"B" * 8192)
    try:
        sim.libxl_add_virtio(0, "virtio,device2", base=BASE, irq=33)
        sim.libxl_add_virtio(1, "virtio,device2", base=BASE + 0x200, irq=34)

        def work() -> None:
            for devid in (0, 1):
                sim.wait_xs(f"{VIRTIO_BE}/{devid}/state", "2")
            for base, size in ((BASE, 4096), (BASE + 0x200, 8192)):
                drv = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, base))  # type: ignore[arg-type]
                drv.init(queues=[0])
                assert struct.unpack("<Q", drv.config_bytes(0, 8))[0] == size // 512

        args = _args(devices, device=[f"blk,path={a},ro", f"blk,path={b}"])
        assert _run_with_guest(sim, args, work) == 0
        assert sim.leaks() == []
    finally:
        sim.close()


def test_disks_4_17_and_generic_devices_of_one_guest_together(
    devices: Any, image: Path, tmp_path: Path
) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        be_disk = sim.libxl_add_virtio_disk(51712, str(image), base=BASE, irq=33)
        be_rng = sim.libxl_add_virtio(0, "virtio,device4", base=BASE + 0x200, irq=34)

        def work() -> None:
            sim.wait_xs(f"{be_disk}/state", "2")
            sim.wait_xs(f"{be_rng}/state", "2")
            exercise_disk(sim, image, BASE)

        assert _run_with_guest(sim, _args(devices), work) == 0
        assert _states(sim, be_disk) == ["1", "2", "6"] and _states(sim, be_rng) == ["1", "2", "6"]
    finally:
        sim.close()


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["blk,path=a.img,base=0x2000000,irq=33", "blk,path=b.img"], "either all or none"),
        (["gpu,x=1"], "unknown device type 'gpu'"),
        (["blk,bogus=1"], "unknown option 'bogus'"),
    ],
)
def test_bad_device_configs_fail_before_any_guest(devices: Any, specs: list[str], message: str) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        with pytest.raises(UserError, match=message):
            dm_only.run(_args(devices, device=specs, wait_timeout=0.2), lib=sim.lib())
        assert sim.xs_writes == [] and sim.leaks() == []
    finally:
        sim.close()


def test_a_configuration_no_device_uses_is_said(devices: Any, image: Path, caplog: Any) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        sim.libxl_add_virtio(0, "virtio,device2", base=BASE, irq=33)

        def work() -> None:
            sim.wait_xs(f"{VIRTIO_BE}/0/state", "2")

        with caplog.at_level(logging.INFO):
            args = _args(devices, device=[f"blk,path={image}", "console,backend=null"])
            assert _run_with_guest(sim, args, work) == 0
        assert any(
            "--device console" in r.getMessage() and "unused" in r.getMessage() for r in caplog.records
        )
    finally:
        sim.close()


@pytest.mark.parametrize(
    ("virtio_id", "ok"),
    [
        (None, True),
        (1, True),
        (0xFFFF, True),
        (0, False),
        (-2, False),
        ("1", False),
        (True, False),
        (1 << 16, False),
    ],
)
def test_a_plugin_declares_its_virtio_id_or_none(devices: Any, virtio_id: Any, ok: bool) -> None:
    from dataclasses import replace

    from vdm.registry import registration_problem

    dt = replace(devices.devices["rng"][0], virtio_id=virtio_id)
    why = registration_problem("devices", dt)
    assert (why is None) == ok, why
    if not ok:
        assert why is not None and "virtio_id" in why
