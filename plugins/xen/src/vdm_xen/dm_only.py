"""``vdm dm-only``: serve vdm's virtio-mmio devices to a Xen guest as an IOREQ server.

Devices come from the command line::

    vdm dm-only --domid 5 --device blk,path=disk.img,base=0x02000000,irq=33

(``base``/``irq``: the virtio-mmio window and SPI the guest's device tree names; the other options
are the device type's own, as for ``vdm run --disk``), or, without ``base``/``irq``, from xenstore
(start vdm before ``xl create``; without ``--domid`` it serves the next guest that gets devices):

* the disks libxl 4.17+ writes for ``disk = [ '..., backendtype=standalone, specification=virtio' ]``
  (image and mode from xenstore);
* Xen 4.18+ libxl's generic devices, ``virtio = [ "type=virtio,device<ID>, transport=mmio" ]``: the
  virtio device id finds the installed plugin that declares it (``DeviceType.virtio_id``: net 1,
  blk 2, console 3, any third party's), and since libxl carries no backend configuration (xl refuses
  unknown keys in a ``virtio`` entry), the n-th ``--device TYPE,OPTIONS`` of a type configures the
  guest's n-th device of that type (``--device net,tapif=vif1,host_ip=10.0.0.1/24``); a device without
  one gets the type's defaults. A device vdm cannot serve -- an id no plugin provides, a config it
  cannot use -- is set Closed with one log line and the others are served; with none left vdm says
  so and exits 1. libxl does not wait for these devices' backend: create the guest paused
  (``xl create -p``) and unpause it once vdm has put its devices in InitWait (``state`` 2).

It ends on SIGTERM/SIGINT, when the guest dies, or when the toolstack closes the devices, and then
releases everything: ranges, event channels, the ioreq server, guest mappings; xenstore state Closed.
It serves one guest and exits 0 after it; a next guest needs a next ``vdm dm-only``. Signals and
the devices' lifecycle are :mod:`vdm.session`'s (the same as ``vdm run`` and ``vdm vhost-user``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

from vdm.config import parse_option_string, quote_option, split_options
from vdm.control import add_control_option, check_control_path
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType
from vdm.session import DeviceSet, StopSignal
from vdm.transport.mmio import MMIO_WINDOW_SIZE

__all__ = ["DeviceConfig", "DeviceSpec", "add_arguments", "parse_config", "parse_device", "run", "serve"]

log = logging.getLogger(__name__)


@dataclass
class DeviceSpec:
    """One device to serve: its type, config, and where the guest expects it."""

    type: DeviceType
    config: Any
    base: int
    irq: int
    xs: Any = None  # the XsDisk handshake when it came from xenstore
    #: libxl's grant_usage=1: the guest's buffers are grant references (xen,grant-dma), so the
    #: device offers VIRTIO_F_ACCESS_PLATFORM, without which Linux refuses such a device
    grants: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--domid", type=int, help="the guest's domain id (xenstore mode: default the next new guest)"
    )
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="TYPE,OPTIONS",
        help="a device, e.g. blk,path=disk.img,base=0x02000000,irq=33 (repeatable); without "
        "base=/irq= it configures the guest's next xenstore device of its type (net,tapif=vif1); "
        "without --device every device is read from xenstore",
    )
    p.add_argument(
        "--irq-kind",
        choices=("spi", "isa"),
        help="how interrupts are raised: spi (Arm, set_irq_level) or isa (x86); default: this host's arch",
    )
    p.add_argument(
        "--wait-timeout", type=float, metavar="SECONDS", help="xenstore mode: give up if no guest appears"
    )
    add_control_option(p)


def _number(what: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UserError(f"--device: {what} wants a number, not {text!r}") from None


def _split(text: str, devices: dict[str, DeviceType]) -> tuple[DeviceType, int | None, int | None, str]:
    """``TYPE,OPTIONS`` -> (type, base, irq, the other options)."""
    kind, _, rest = text.partition(",")
    dt = devices.get(kind)
    if dt is None:
        raise UserError(
            f"--device: unknown device type {kind!r} (known: {', '.join(sorted(devices)) or 'none'})"
        )
    base = irq = None
    keep = []
    for item in split_options(rest, dt.config):  # unescaped: a value may hold a comma (a,,b)
        key, sep, value = item.partition("=")
        if sep and key == "base":
            base = _number("base", value)
        elif sep and key == "irq":
            irq = _number("irq", value)
        elif item:
            keep.append(quote_option(item))
    return dt, base, irq, ",".join(keep)


def _places(text: str) -> bool:
    """Whether ``--device TEXT`` says where the guest looks (base= or irq=)."""
    return any(item.partition("=")[0] in ("base", "irq") for item in split_options(text)[1:])


def parse_device(text: str, devices: dict[str, DeviceType]) -> DeviceSpec:
    """``blk,path=disk.img,base=0x02000000,irq=33`` -> a :class:`DeviceSpec`."""
    dt, base, irq, options = _split(text, devices)
    kind = dt.name
    if base is None or irq is None:
        raise UserError(
            f"--device {kind}: base= and irq= are required (where the guest looks for the device)"
        )
    if base < 0 or base % MMIO_WINDOW_SIZE or irq < 0:
        raise UserError(
            f"--device {kind}: base 0x{base:x} must be 0x{MMIO_WINDOW_SIZE:x}-aligned, irq not negative"
        )
    cfg = parse_option_string(dt.config, options, f"--device {kind}", dt.positional)
    return DeviceSpec(dt, cfg, base, irq)


@dataclass
class DeviceConfig:
    """A ``--device TYPE,OPTIONS`` without a place: the configuration of a xenstore device of TYPE."""

    type: DeviceType
    options: str  # the type's ``virtio_options``, then the user's
    text: str  # as given, for messages
    used: bool = False

    def config(self) -> Any:
        return _virtio_config(self.type, self.options, f"--device {self.text}")


def _virtio_config(dt: DeviceType, user: str, what: str) -> Any:
    options = ",".join(o for o in (dt.virtio_options, user) if o)
    return parse_option_string(dt.config, options, what, None if dt.virtio_options else dt.positional)


def parse_config(text: str, devices: dict[str, DeviceType]) -> DeviceConfig:
    """``net,tapif=vif1`` -> a checked :class:`DeviceConfig` (bad options fail here, before any guest)."""
    dt, _, _, options = _split(text, devices)
    if dt.virtio_id is None:
        raise UserError(f"--device {dt.name}: this device type declares no virtio device id")
    dc = DeviceConfig(dt, options, text)
    dc.config()
    return dc


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
    control: str | None = None,
    stats: dict[str, str] | None = None,
) -> str:
    """Serve ``specs`` to ``domid`` until ``stop_fd`` is readable or the guest goes; returns why.

    ``on_ready(vmm)`` is called once every device is attached and announced (tests drive the guest
    from there). ``control``: serve ``vdm ctl``'s socket there (:mod:`vdm.control`). ``stats``, if
    given, gets ``"memory"``: how many grant and foreign mappings were made, and ``"traffic"``: how many
    ioreqs were served and interrupts raised (both set however it ends).
    """
    from .vmm import XenVmm

    backend = XenVmm(lib, domid, irq_kind=irq_kind)
    memory = backend.memory
    try:
        return _serve(backend, domid, specs, stop_fd, xs, tick, on_ready, control)
    finally:
        if memory is not None:
            summary = memory.summary()
            log.info("dom%d: guest memory: %s", domid, summary)
            traffic = backend.traffic()
            log.info("dom%d: %s", domid, traffic)
            if stats is not None:
                stats["memory"] = summary
                stats["traffic"] = traffic


def _serve(
    backend: Any,
    domid: int,
    specs: list[DeviceSpec],
    stop_fd: int,
    xs: Any,
    tick: float,
    on_ready: Callable[[Any], None] | None,
    control: str | None,
) -> str:
    from vdm.device import F_ACCESS_PLATFORM, VirtioDevice
    from vdm.vmm import Vmm

    # closed in this order: the VMM's transports, the devices (newest first), the ioreq server,
    # then each xenstore handshake (state Closed once everything is released)
    with DeviceSet() as devices:
        for spec in reversed(specs):
            if spec.xs is not None:
                devices.hold(spec.xs.disconnect, f"{spec.type.name}'s xenstore handshake")
        devices.hold(backend.close, f"dom{domid}'s ioreq server")
        backend.start()
        vmm = Vmm(backend, name=f"dom{domid}")
        devices.using(vmm.close, "the VMM")
        ctx = DeviceContext(vm_name=f"dom{domid}", vmm=vmm)
        for spec in specs:
            dev = devices.create(spec.type, spec.config, ctx)
            if not isinstance(dev, VirtioDevice):
                raise UserError(f"{spec.type.name}: dm-only serves virtio devices only")
            if spec.grants:  # the driver must know its addresses go through the grant "IOMMU"
                dev.core_features = dev.core_features | 1 << F_ACCESS_PLATFORM
            vmm.attach_mmio(dev, base=spec.base, irq=spec.irq)
            log.info(
                "dom%d: %s at 0x%x, irq %d%s",
                domid,
                dev.name,
                spec.base,
                spec.irq,
                " (grants: VIRTIO_F_ACCESS_PLATFORM offered)" if spec.grants else "",
            )
        devices.serve_control(control)
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


def _check_place(entry: Any) -> None:
    if entry.base < 0 or entry.base % MMIO_WINDOW_SIZE or not 0 <= entry.irq < 1020:
        raise UserError(
            f"{entry.backend}: base 0x{entry.base:x} / irq {entry.irq} are not a virtio-mmio window"
        )


def _blk_from_xenstore(devices: dict[str, DeviceType], entry: Any) -> DeviceSpec:
    """A libxl virtio disk: served by the device type with that virtio id that maps a toolstack disk
    to its own options (``DeviceType.from_toolstack_disk``; dm-only knows no plugin's field names)."""
    dt = next(
        (d for _, d in sorted(devices.items()) if d.virtio_id == entry.virtio_id and d.from_toolstack_disk),
        None,
    )
    if dt is None or dt.from_toolstack_disk is None:
        raise UserError("xenstore describes a virtio disk but no installed plugin serves it: install vdm-blk")
    from vdm.config import config_from_mapping

    _check_place(entry)
    try:  # a plugin's callable: whatever it does wrong costs this device only
        options = dict(dt.from_toolstack_disk(entry.params, entry.writable))
    except Exception as e:
        raise UserError(f"{dt.name}: from_toolstack_disk failed: {type(e).__name__}: {e}") from None
    cfg = config_from_mapping(dt.config, options, entry.backend)
    return DeviceSpec(dt, cfg, entry.base, entry.irq)


def _generic_from_xenstore(
    devices: dict[str, DeviceType], configs: list[DeviceConfig], entry: Any
) -> DeviceSpec:
    """A generic virtio device: the plugin declaring its id, the next unused ``--device`` of that type."""
    if entry.virtio_id is None:
        raise UserError(f"type {entry.type!r} names no virtio device id (virtio,device<hex id>)")
    providers = [dt for _, dt in sorted(devices.items()) if dt.virtio_id == entry.virtio_id]
    if not providers:
        known = (
            ", ".join(f"{n} {dt.virtio_id}" for n, dt in sorted(devices.items()) if dt.virtio_id) or "none"
        )
        raise UserError(
            f"{entry.type}: virtio device id {entry.virtio_id}: no installed plugin provides it "
            f"(installed: {known})"
        )
    _check_place(entry)
    dt = providers[0]
    dc = next((c for c in configs if c.type is dt and not c.used), None)
    if dc is not None:
        dc.used = True
        cfg = dc.config()
    else:
        try:
            cfg = _virtio_config(dt, "", entry.backend)
        except UserError as e:
            raise UserError(f"{e} (give it with --device {dt.name},...)") from None
    if entry.grant_usage:
        log.info("%s: grant_usage=1: the guest's buffers are grant references", entry.backend)
    return DeviceSpec(dt, cfg, entry.base, entry.irq, grants=bool(entry.grant_usage))


def _from_xenstore(
    xs: Any, entries: list[Any], devices: dict[str, DeviceType], configs: list[DeviceConfig]
) -> list[DeviceSpec]:
    """The devices of one guest that vdm can serve; the others are closed with one line each."""
    from .xenstore import DISK_KIND, XenStoreError, XsDevice

    specs = []
    for entry in entries:
        handshake = XsDevice(xs, entry)
        try:
            if entry.kind == DISK_KIND:
                spec = _blk_from_xenstore(devices, entry)
            else:
                spec = _generic_from_xenstore(devices, configs, entry)
        except UserError as e:
            log.error("dom%d: %s: not served, closed: %s", entry.fe_domid, entry.backend, e)
            handshake.fail()
            continue
        try:
            handshake.connect()
        except XenStoreError as e:
            raise UserError(f"xenstore: {e.strerror}") from None
        spec.xs = handshake
        specs.append(spec)
    for dc in configs:
        if not dc.used:
            log.warning("--device %s unused: the guest has no more devices of type %s", dc.text, dc.type.name)
    return specs


def run(args: argparse.Namespace, lib: Any = None) -> int:
    """The command: build the device list, serve, clean up. Returns the exit status."""
    from .bindings import XenLibraryError, load
    from .ioreq import XenError
    from .xenstore import XenStore, XenStoreError, wait_for_devices

    plugins = args.plugin_set
    devices = {name: dt for name, (dt, _) in plugins.devices.items()}
    placed = [_places(text) for text in args.device]
    if any(placed) and not all(placed):
        raise UserError(
            "--device: give base=/irq= for either all or none of the devices (none: they come from xenstore)"
        )
    if all(placed):
        specs = [parse_device(text, devices) for text in args.device]
        configs: list[DeviceConfig] = []
    else:
        specs = []
        configs = [parse_config(text, devices) for text in args.device]
    if getattr(args, "control", None):
        check_control_path(args.control)
    if lib is None:
        try:
            lib = load()
        except XenLibraryError as e:
            raise UserError(str(e)) from None
    xs = None
    # SIGTERM/SIGINT make stop.fileno() readable, whichever thread the signal lands on; the
    # xenstore wait and the IOREQ loop poll it
    with StopSignal() as stop:
        try:
            if not specs:
                try:
                    xs = XenStore(lib)
                except XenStoreError as e:
                    msg = f"{e.strerror} (or give the devices with --device ...,base=,irq=)"
                    raise UserError(msg) from None
                from .xenstore import own_domid

                be = own_domid(xs)
                try:
                    entries = wait_for_devices(xs, be, args.domid, stop.fileno(), args.wait_timeout)
                except (TimeoutError, InterruptedError) as e:
                    raise UserError(str(e)) from None
                except XenStoreError as e:
                    raise UserError(f"xenstore: {e.strerror}") from None
                domid = entries[0].fe_domid
                try:
                    specs = _from_xenstore(xs, entries, devices, configs)
                    if not specs:
                        raise UserError(f"dom{domid}: nothing to serve (every device was closed, see above)")
                except BaseException:
                    for spec in specs:
                        spec.xs.disconnect()
                    raise
            elif args.domid is None:
                raise UserError("--domid is required with --device ...,base=,irq=")
            else:
                domid = args.domid
                try:
                    xs = XenStore(lib)  # only to hear about the domain's death sooner
                except XenStoreError:
                    xs = None
            stats: dict[str, str] = {}
            try:
                why = serve(
                    lib,
                    domid,
                    specs,
                    stop.fileno(),
                    xs=xs,
                    irq_kind=args.irq_kind,
                    control=getattr(args, "control", None),
                    stats=stats,
                )
            except XenError as e:
                raise UserError(f"dom{domid}: {e.strerror}") from None
        finally:
            if xs is not None:
                xs.close()
    memory = stats.get("memory", "-")
    print(f"vdm: dm-only for dom{domid} ended: {why}; guest memory: {memory}", file=sys.stderr)
    return 0
