"""``vdm dm-only`` end to end against the simulated Xen: a virtio-blk disk (vdm-blk's device behind
the core's virtio-mmio transport) driven by guest MMIO accesses that travel as ioreqs, with data
written, read back and checked in the image; devices from the command line and from xenstore;
ends on SIGTERM and on the domain's death with everything released."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import struct
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from vdm.errors import UserError
from vdm.registry import DeviceType
from vdm.testing.driver import VirtioTestDriver
from vdm_xen import dm_only
from vdm_xen.sim import SimXen

from tests.xen.dm_only_setup import (
    BASE,
    T_FLUSH,
    T_IN,
    T_OUT,
    GuestMmio,
    blk_plugins,
    blk_spec,
    hdr,
    serving,
)


@pytest.fixture(scope="module")
def plugins() -> Any:
    return blk_plugins()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def exercise_disk(sim: SimXen, image: Path, base: int = BASE) -> None:
    """What a guest's virtio-blk driver does: probe, set up a queue, write, flush, read, verify."""
    drv = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, base))  # type: ignore[arg-type]
    assert drv.reg_read(0x008) == 2  # DeviceID: block
    drv.init(queues=[0])
    capacity = struct.unpack("<Q", drv.config_bytes(0, 8))[0]
    assert capacity == image.stat().st_size // 512
    data = os.urandom(3 * 4096 + 512)
    u = drv.request(0, [hdr(T_OUT, 40), data], [1], timeout=20)
    assert u.data == b"\x00"
    assert drv.request(0, [hdr(T_FLUSH)], [1], timeout=20).data == b"\x00"
    u = drv.request(0, [hdr(T_IN, 40)], [len(data), 1], timeout=20)
    assert u.data == data + b"\x00"
    with open(image, "rb") as f:
        f.seek(40 * 512)
        assert f.read(len(data)) == data
    u = drv.request(0, [hdr(T_IN, capacity)], [512, 1], timeout=20)  # past the end
    assert u.data[-1] == 1  # IOERR
    sim.ram.check_guards()


def test_blk_disk_from_the_command_line(plugins: Any, image: Path) -> None:
    sim = SimXen(nr_vcpus=2)
    try:
        with serving(sim, [blk_spec(plugins, image)]):
            exercise_disk(sim, image)
            sim.wait_irq(lambda log: ("spi", 33, 1) in log)  # used-buffer interrupts reach the guest's SPI
            assert sim.violations == []
        assert sim.leaks() == []
        assert sim.violations == []
        assert sim.requests_done > 40
    finally:
        sim.close()


def _args(plugins: Any, **kw: Any) -> argparse.Namespace:
    ns = argparse.Namespace(plugin_set=plugins, domid=None, device=[], irq_kind="spi", wait_timeout=20)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def _guest(sim: SimXen, work: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            work()
        except BaseException as e:
            errors.append(e)
            sim.destroy_domain()  # let the device model end so the test sees the error

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, errors


def test_xenstore_handshake_as_libxl_4_17_writes_it(plugins: Any, image: Path, capsys: Any) -> None:
    sim = SimXen(nr_vcpus=2)
    try:
        be = sim.libxl_add_virtio_disk(51712, str(image), base=BASE + 0x200, irq=34, mode="w")
        claims_at_initwait: list[Any] = []
        sim.on_xs_write.append(
            lambda path, value: (
                claims_at_initwait.append([list(s.mmio) for s in sim.servers.values()])
                if path == f"{be}/state" and value == "2"
                else None
            )
        )

        def work() -> None:
            sim.wait_xs(f"{be}/state", "2")  # what libxl waits for before it unpauses the guest
            exercise_disk(sim, image, BASE + 0x200)
            sim.destroy_domain()

        t, errors = _guest(sim, work)
        assert dm_only.run(_args(plugins), lib=sim.lib()) == 0
        t.join(20)
        assert not errors, errors
        assert claims_at_initwait == [[[(BASE + 0x200, BASE + 0x3FF)]]]  # claimed before InitWait
        states = [v for p, v in sim.xs_writes if p == f"{be}/state"]
        assert states == ["1", "2", "6"]  # libxl: Initialising; us: InitWait, then Closed
        assert "dom1 is gone" in capsys.readouterr().err
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def serve_read_only_xenstore_disk(plugin_set: Any, image: Path) -> None:
    """A read-only virtio disk that libxl wrote to xenstore, served by dm-only from ``plugin_set``:
    the guest sees VIRTIO_BLK_F_RO, its write fails with IOERR, the image is unchanged."""
    sim = SimXen(nr_vcpus=1)
    try:
        sim.libxl_add_virtio_disk(51712, str(image), base=BASE, irq=33, mode="r")
        before = image.read_bytes()

        def work() -> None:
            sim.wait_xs(f"/local/domain/0/backend/virtio_disk/{sim.domid}/51712/state", "2")
            drv = VirtioTestDriver(None, ram=sim.ram, transport=GuestMmio(sim, BASE))  # type: ignore[arg-type]
            drv.init(queues=[0])
            assert drv.features >> 5 & 1  # VIRTIO_BLK_F_RO
            assert drv.request(0, [hdr(T_OUT, 0), bytes(512)], [1], timeout=20).data == b"\x01"
            sim.destroy_domain()

        t, errors = _guest(sim, work)
        assert dm_only.run(_args(plugin_set, domid=sim.domid), lib=sim.lib()) == 0
        t.join(20)
        assert not errors, errors
        assert image.read_bytes() == before
        assert sim.leaks() == []
    finally:
        sim.close()


def test_read_only_disk_from_xenstore(plugins: Any, image: Path) -> None:
    serve_read_only_xenstore_disk(plugins, image)


def test_toolstack_closing_the_device_ends_it(plugins: Any, image: Path) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        be = sim.libxl_add_virtio_disk(51712, str(image), base=BASE, irq=33)

        def work() -> None:
            sim.wait_xs(f"{be}/state", "2")
            sim.xs_write(f"{be}/state", "5")  # libxl tears the device down (Closing)

        t, errors = _guest(sim, work)
        assert dm_only.run(_args(plugins), lib=sim.lib()) == 0
        t.join(20)
        assert not errors, errors
        assert sim.store[f"{be}/state"] == "6"
        assert sim.leaks() == []
    finally:
        sim.close()


def test_sigterm_ends_it_cleanly(plugins: Any, image: Path, capsys: Any) -> None:
    before = signal.getsignal(signal.SIGTERM)  # another test's handler may be installed
    sim = SimXen(nr_vcpus=2, xenstore=False)
    try:

        def work() -> None:
            deadline = time.monotonic() + 10
            while not any(s.mmio for s in list(sim.servers.values())):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert sim.mmio_read(BASE, 4) == 0x74726976  # "virt"
            os.kill(os.getpid(), signal.SIGTERM)

        t, errors = _guest(sim, work)
        spec = f"blk,path={image},base={BASE},irq=33"
        assert dm_only.run(_args(plugins, domid=sim.domid, device=[spec]), lib=sim.lib()) == 0
        t.join(20)
        assert not errors, errors
        assert "stopped by signal" in capsys.readouterr().err
        assert sim.leaks() == [] and sim.violations == []
        assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    finally:
        sim.close()


def test_sigusr1_runs_its_handler_and_dm_only_keeps_serving(plugins: Any, image: Path, capsys: Any) -> None:
    """``kill -USR1`` (vdm's stack dump) is not a stop: every signal with a Python handler writes
    the wakeup fd, which used to be dm-only's stop pipe, so the dump ended the guest's devices."""
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    sim = SimXen(nr_vcpus=2, xenstore=False)
    try:

        def work() -> None:
            deadline = time.monotonic() + 10
            while not any(s.mmio for s in list(sim.servers.values())):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGUSR1)
            while not seen:
                assert time.monotonic() < deadline + 10
                time.sleep(0.01)
            exercise_disk(sim, image)  # still served after the signal's handler ran
            os.kill(os.getpid(), signal.SIGTERM)

        t, errors = _guest(sim, work)
        spec = f"blk,path={image},base={BASE},irq=33"
        assert dm_only.run(_args(plugins, domid=sim.domid, device=[spec]), lib=sim.lib()) == 0
        t.join(20)
        assert not errors, errors
        assert seen == [signal.SIGUSR1]
        assert "stopped by signal" in capsys.readouterr().err
        assert sim.leaks() == [] and sim.violations == []
    finally:
        signal.signal(signal.SIGUSR1, old)
        sim.close()


def test_domain_death_noticed_without_xenstore(plugins: Any, image: Path, capsys: Any) -> None:
    sim = SimXen(nr_vcpus=1, xenstore=False)
    try:

        def work() -> None:
            while not any(s.mmio for s in list(sim.servers.values())):
                time.sleep(0.01)
            sim.destroy_domain()

        t, errors = _guest(sim, work)
        spec = f"blk,path={image},base={BASE},irq=33"
        assert dm_only.run(_args(plugins, domid=sim.domid, device=[spec]), lib=sim.lib()) == 0
        t.join(20)
        assert not errors, errors
        assert "dom1 is gone" in capsys.readouterr().err
        assert sim.leaks() == []
    finally:
        sim.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("blk,path=x.img,irq=33", "base= and irq= are required"),
        ("blk,path=x.img,base=0x2000000", "base= and irq= are required"),
        ("blk,path=x.img,base=0x2000010,irq=33", "0x200-aligned"),
        ("blk,path=x.img,base=zero,irq=33", "base wants a number"),
        ("gpu,base=0,irq=33", "unknown device type 'gpu'"),
        ("blk,base=0x2000000,irq=33", "missing option path"),
        ("blk,path=x.img,base=0x2000000,irq=33,bogus=1", "unknown option 'bogus'"),
    ],
)
def test_bad_device_options(plugins: Any, text: str, message: str) -> None:
    devices = {n: dt for n, (dt, _) in plugins.devices.items()}
    with pytest.raises(UserError, match=message):
        dm_only.parse_device(text, devices)


def test_device_options_reach_the_device_config(plugins: Any) -> None:
    devices = {n: dt for n, (dt, _) in plugins.devices.items()}
    spec = dm_only.parse_device("blk,path=d.img,ro,base=0x02000200,irq=34,serial=abc", devices)
    assert (spec.base, spec.irq, spec.config.path, spec.config.ro, spec.config.serial) == (
        0x02000200,
        34,
        "d.img",
        True,
        "abc",
    )


def test_missing_image_is_one_clear_error_and_nothing_is_left(plugins: Any, tmp_path: Path) -> None:
    sim = SimXen(nr_vcpus=1, xenstore=False)
    try:
        spec = f"blk,path={tmp_path / 'nope.img'},base={BASE},irq=33"
        with pytest.raises(UserError, match=r"nope\.img"):
            dm_only.run(_args(plugins, domid=sim.domid, device=[spec]), lib=sim.lib())
        assert sim.leaks() == []
    finally:
        sim.close()


def test_no_hypervisor_is_a_user_error(plugins: Any, image: Path) -> None:
    sim = SimXen(privcmd=False, xenstore=False)
    try:
        spec = f"blk,path={image},base={BASE},irq=33"
        with pytest.raises(UserError, match="ENOENT"):
            dm_only.run(_args(plugins, domid=1, device=[spec]), lib=sim.lib())
        assert sim.leaks() == []
    finally:
        sim.close()


def test_probe_against_the_simulator() -> None:
    from vdm_xen.probe import NO_HYPERVISOR, NO_IOREQ, NOT_PRIVILEGED, probe_lib

    for kw, expected in (
        ({}, None),
        ({"privcmd": False}, NO_HYPERVISOR),
        ({"privileged": False}, NOT_PRIVILEGED),
        ({"ioreq_support": False}, NO_IOREQ),
    ):
        sim = SimXen(**kw)
        try:
            assert probe_lib(sim.lib()) == expected, kw
            assert sim.leaks() == []
        finally:
            sim.close()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base", "zzz", "base/irq missing or not numbers"),
        ("base", "33554440", "not a virtio-mmio window"),
        ("irq", "-1", "not a virtio-mmio window"),
        ("params", None, "params is missing"),
        ("mode", None, "mode is missing"),
    ],
)
def test_bad_xenstore_entries_are_one_clear_error(
    plugins: Any, image: Path, key: str, value: str | None, message: str, caplog: Any
) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        be = sim.libxl_add_virtio_disk(51712, str(image), base=BASE, irq=33)
        if value is None:
            sim.xs_rm(f"{be}/{key}")
        else:
            sim.xs_write(f"{be}/{key}", value)
        with pytest.raises(UserError) as error:
            dm_only.run(_args(plugins), lib=sim.lib())
        # unreadable entries stop vdm; a readable one it cannot serve is closed with its reason logged
        said = [str(error.value)] + [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert [s for s in said if message in s], said
        assert sim.leaks() == [] and sim.violations == []
    finally:
        sim.close()


def test_waiting_for_a_guest_gives_up_after_the_timeout(plugins: Any) -> None:
    sim = SimXen(nr_vcpus=1)
    try:
        with pytest.raises(UserError, match="no virtio device for dom1"):
            dm_only.run(_args(plugins, domid=1, wait_timeout=0.3), lib=sim.lib())
        assert sim.leaks() == []
    finally:
        sim.close()


def test_command_line_options() -> None:
    p = argparse.ArgumentParser()
    dm_only.add_arguments(p)
    a = p.parse_args(
        ["--domid", "3", "--device", "blk,path=a,base=0,irq=33", "--device", "blk,path=b,base=512,irq=34"]
    )
    assert (a.domid, a.device, a.irq_kind, a.wait_timeout) == (
        3,
        ["blk,path=a,base=0,irq=33", "blk,path=b,base=512,irq=34"],
        None,
        None,
    )
    assert p.parse_args(["--irq-kind", "isa"]).irq_kind == "isa"
    with pytest.raises(SystemExit):
        p.parse_args(["--irq-kind", "msi"])


def test_device_options_keep_commas_inside_values(plugins: Any, tmp_path: Path) -> None:
    """``--device`` is split by dm-only itself (base=, irq=): a doubled or escaped comma stays in
    its value."""
    devices = {n: dt for n, (dt, _) in plugins.devices.items()}
    text = f"blk,path={tmp_path}/a,,b.img,base=0x02000000,irq=33,ro"
    assert dm_only._places(text)
    spec = dm_only.parse_device(text, devices)
    assert (spec.config.path, spec.config.ro, spec.base, spec.irq) == (f"{tmp_path}/a,b.img", True, BASE, 33)
    spec = dm_only.parse_device(f"blk,path={tmp_path}/c\\,d.img,irq=33,base=0x02000000", devices)
    assert spec.config.path == f"{tmp_path}/c,d.img"


@dataclasses.dataclass
class OtherDiskConfig:
    """A third party's disk device whose options are not vdm-blk's ``path``/``ro``."""

    image: str = dataclasses.field(default="", metadata={"help": "the image"})
    readonly: bool = dataclasses.field(default=False, metadata={"help": "read-only"})


def test_xenstore_disk_served_by_a_plugin_with_its_own_option_names(plugins: Any, image: Path) -> None:
    """dm-only knows no disk plugin's field names: the device type maps a toolstack disk itself."""
    blk, _ = plugins.devices["blk"]
    seen: list[OtherDiskConfig] = []

    def create(config: OtherDiskConfig, ctx: Any) -> Any:
        seen.append(config)
        return blk.create(blk.config(path=config.image, ro=config.readonly), ctx)

    other = DeviceType(
        name="otherdisk", config=OtherDiskConfig, create=create, positional="image", virtio_id=2,
        from_toolstack_disk=lambda params, writable: {"image": params, "readonly": not writable},
    )
    only_other = types.SimpleNamespace(devices={"otherdisk": (other, "a third-party plugin")})
    serve_read_only_xenstore_disk(only_other, image)
    assert [(c.image, c.readonly) for c in seen] == [(str(image), True)]
