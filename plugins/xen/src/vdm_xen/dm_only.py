"""``vdm dm-only``: serve vdm's virtio-mmio devices to a Xen guest as an IOREQ server.

Devices come from the command line::

    vdm dm-only --domid 5 --device blk,path=disk.img,base=0x02000000,irq=33

(``base``/``irq``: the virtio-mmio window and SPI the guest's device tree names; the other options
are the device type's own, as for ``vdm run --disk``), or, without ``--device``, from xenstore:
the disks libxl 4.17 writes for ``disk = [ '..., backendtype=standalone, specification=virtio' ]``
(start vdm before ``xl create``; without ``--domid`` it serves the next guest that gets one).

It ends on SIGTERM/SIGINT, when the guest dies, or when the toolstack closes the devices, and then
releases everything: ranges, event channels, the ioreq server, guest mappings; xenstore state Closed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable

from vdm.cli.devices import close_devices, create_device
from vdm.config import parse_option_string
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType

__all__ = ["DeviceSpec", "add_arguments", "parse_device", "run", "serve"]

log = logging.getLogger(__name__)


@dataclass
class DeviceSpec:
    """One device to serve: its type, config, and where the guest expects it."""

    type: DeviceType
    config: Any
    base: int
    irq: int
    xs: Any = None  # the XsDisk handshake when it came from xenstore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--domid", type=int, help="the guest's domain id (xenstore mode: default the next new guest)"
    )
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="TYPE,OPTIONS",
        help="a device, e.g. blk,path=disk.img,base=0x02000000,irq=33 (repeatable); "
        "without --device the guest's disks are read from xenstore",
    )
    p.add_argument(
        "--irq-kind",
        choices=("spi", "isa"),
        help="how interrupts are raised: spi (Arm, set_irq_level) or isa (x86); default: this host's arch",
    )
    p.add_argument(
        "--wait-timeout", type=float, metavar="SECONDS", help="xenstore mode: give up if no guest appears"
    )


def _number(what: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UserError(f"--device: {what} wants a number, not {text!r}") from None


def parse_device(text: str, devices: dict[str, DeviceType]) -> DeviceSpec:
    """``blk,path=disk.img,base=0x02000000,irq=33`` -> a :class:`DeviceSpec`."""
    kind, _, rest = text.partition(",")
    dt = devices.get(kind)
    if dt is None:
        raise UserError(
            f"--device: unknown device type {kind!r} (known: {', '.join(sorted(devices)) or 'none'})"
        )
    base = irq = None
    keep = []
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        if sep and key == "base":
            base = _number("base", value)
        elif sep and key == "irq":
            irq = _number("irq", value)
        elif item:
            keep.append(item)
    if base is None or irq is None:
        raise UserError(
            f"--device {kind}: base= and irq= are required (where the guest looks for the device)"
        )
    if base < 0 or base % 0x200 or irq < 0:
        raise UserError(f"--device {kind}: base 0x{base:x} must be 0x200-aligned, irq not negative")
    cfg = parse_option_string(dt.config, ",".join(keep), f"--device {kind}", dt.positional)
    return DeviceSpec(dt, cfg, base, irq)


def _stop_pipe() -> tuple[int, int, Callable[[], None]]:
    """A pipe written by SIGTERM/SIGINT; returns (read fd, write fd, restore)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    old = {}

    def on_signal(signum: int, frame: Any) -> None:
        try:
            os.write(w, b"s")
        except OSError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, on_signal)
    # The Python-level handler runs only in the main thread, and only once something wakes it;
    # the wakeup fd is written by the C handler in whichever thread the kernel picked, so the
    # main thread's poll on ``r`` wakes even when the signal landed on a device thread.
    try:
        old_wakeup: int | None = signal.set_wakeup_fd(w)
    except ValueError:  # not the main thread (embedded use): the handler alone must do
        old_wakeup = None

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)
        os.close(r)
        os.close(w)

    return r, w, restore


def serve(
    lib: Any,
    domid: int,
    specs: list[DeviceSpec],
    stop_fd: int,
    *,
    xs: Any = None,
    irq_kind: str | None = None,
    tick: float = 1.0,
    on_ready: Callable[[Any], None] | None = None,
) -> str:
    """Serve ``specs`` to ``domid`` until ``stop_fd`` is readable or the guest goes; returns why.

    ``on_ready(vmm)`` is called once every device is attached and announced (tests drive the guest
    from there).
    """
    from vdm.device import VirtioDevice
    from vdm.vmm import Vmm

    from .backend import XenBackend

    backend = XenBackend(lib, domid, irq_kind=irq_kind)
    vmm = None
    devices: list[Any] = []
    reason = "stopped"
    try:
        backend.start()
        vmm = Vmm(backend, name=f"dom{domid}")
        ctx = DeviceContext(vm_name=f"dom{domid}", vmm=vmm)
        for spec in specs:
            dev = create_device(spec.type, spec.config, ctx)
            devices.append(dev)
            if not isinstance(dev, VirtioDevice):
                raise UserError(f"{spec.type.name}: dm-only serves virtio devices only")
            vmm.attach_mmio(dev, base=spec.base, irq=spec.irq)
            log.info("dom%d: %s at 0x%x, irq %d", domid, dev.name, spec.base, spec.irq)
        for spec in specs:  # ranges are claimed: now the toolstack may let the guest run
            if spec.xs is not None:
                spec.xs.ready()
        if on_ready is not None:
            on_ready(vmm)
        state = {"why": None}

        def check_domain() -> None:
            if not backend.domain_alive():
                state["why"] = f"dom{domid} is gone"

        readers = {}
        if xs is not None:

            def on_xenstore() -> None:
                events = xs.events()
                if any(path == "@releaseDomain" for path, _ in events):
                    check_domain()
                for spec in specs:
                    if spec.xs is not None and state["why"] is None:
                        state["why"] = spec.xs.ended()

            xs.watch("@releaseDomain", "vdm-release")
            readers[xs.fileno()] = on_xenstore
        assert backend.server is not None
        backend.server.serve(
            stop_fd,
            readers=readers,
            tick=tick,
            on_tick=check_domain,
            should_stop=lambda: state["why"] is not None,
        )
        reason = state["why"] or "stopped by signal"
        if xs is not None:
            xs.unwatch("@releaseDomain", "vdm-release")
        return reason
    finally:
        if vmm is not None:
            vmm.close()
        close_devices(devices)
        backend.close()
        for spec in specs:
            if spec.xs is not None:
                try:
                    spec.xs.disconnect()
                except Exception:
                    log.exception("xenstore disconnect")


def _blk_from_xenstore(devices: dict[str, DeviceType], entry: Any) -> DeviceSpec:
    dt = devices.get("blk")
    if dt is None:
        raise UserError("xenstore describes a virtio disk but no blk device plugin (vdm-blk) is installed")
    from vdm.config import config_from_mapping

    if entry.base < 0 or entry.base % 0x200 or not 0 <= entry.irq < 1020:
        raise UserError(
            f"{entry.backend}: base 0x{entry.base:x} / irq {entry.irq} are not a virtio-mmio window"
        )
    cfg = config_from_mapping(dt.config, {"path": entry.params, "ro": not entry.writable}, entry.backend)
    return DeviceSpec(dt, cfg, entry.base, entry.irq)


def run(args: argparse.Namespace, lib: Any = None) -> int:
    """The command: build the device list, serve, clean up. Returns the exit status."""
    from .bindings import XenLibraryError, load
    from .ioreq import XenError
    from .xenstore import XenStore, XenStoreError, XsDisk, wait_for_disks

    plugins = args.plugin_set
    devices = {name: dt for name, (dt, _) in plugins.devices.items()}
    specs = [parse_device(text, devices) for text in args.device]
    if lib is None:
        try:
            lib = load()
        except XenLibraryError as e:
            raise UserError(str(e)) from None
    stop_r, _stop_w, restore = _stop_pipe()
    xs = None
    try:
        if not specs:
            try:
                xs = XenStore(lib)
            except XenStoreError as e:
                raise UserError(f"{e.strerror} (or give the devices with --device)") from None
            from .xenstore import own_domid

            be = own_domid(xs)
            try:
                entries = wait_for_disks(xs, be, args.domid, stop_r, args.wait_timeout)
                for entry in entries:
                    spec = _blk_from_xenstore(devices, entry)
                    spec.xs = XsDisk(xs, entry)
                    spec.xs.connect()
                    specs.append(spec)
            except (TimeoutError, InterruptedError) as e:
                raise UserError(str(e)) from None
            except XenStoreError as e:
                raise UserError(f"xenstore: {e.strerror}") from None
            domid = entries[0].fe_domid
        elif args.domid is None:
            raise UserError("--domid is required with --device")
        else:
            domid = args.domid
            try:
                xs = XenStore(lib)  # only to hear about the domain's death sooner
            except XenStoreError:
                xs = None
        try:
            why = serve(lib, domid, specs, stop_r, xs=xs, irq_kind=args.irq_kind)
        except XenError as e:
            raise UserError(f"dom{domid}: {e.strerror}") from None
        print(f"vdm: dm-only for dom{domid} ended: {why}", file=sys.stderr)
        return 0
    finally:
        if xs is not None:
            xs.close()
        restore()
