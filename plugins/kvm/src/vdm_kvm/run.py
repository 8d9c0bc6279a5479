"""``vdm run``: create a KVM VM, attach vdm's devices, boot a Linux kernel (like ``lkvm run``).

Options follow kvmtool: ``-k/--kernel``, ``-i/--initrd``, ``-p/--params``, ``-m/--mem``,
``-c/--cpus``, one option per device type the installed plugins provide (``-d/--disk``,
``-n/--network``, ...), ``--console serial|virtio``, ``--virtio-transport pci|mmio``, ``--name``;
or a TOML VM file (``vdm run vm.toml``) with the same keys. The exit status is 0 when the guest
powers off or reboots, or vdm is ended by SIGTERM/SIGINT (devices closed, as QEMU does); 1 with a
message on anything else. Signals, the wait for the VM's end and the devices' lifecycle are
:mod:`vdm.session`'s (the same as ``vdm dm-only`` and ``vdm vhost-user``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from typing import Any

from vdm.cli.devices import add_device_options, device_configs
from vdm.config import OPTION_SYNTAX_HELP, load_toml
from vdm.control import add_control_option, check_control_path
from vdm.device import VirtioDevice
from vdm.errors import UserError
from vdm.plugins import PluginSet
from vdm.registry import DeviceContext
from vdm.session import DeviceSet, StopSignal
from vdm.transport.mmio import MMIO_WINDOW_SIZE

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

#: What every guest gets on its command line (the user's --params are appended).
BASE_PARAMS = "reboot=k panic=-1 i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable"


def default_kernel() -> str | None:
    path = f"/boot/vmlinuz-{platform.release()}"
    return path if os.path.exists(path) else None


def add_arguments(p: argparse.ArgumentParser, plugins: PluginSet | None = None) -> None:
    p.add_argument("vm_file", nargs="?", metavar="VM.toml", help="a TOML VM file (options below override it)")
    p.add_argument("-k", "--kernel", help="bzImage to boot (default: /boot/vmlinuz-$(uname -r))")
    p.add_argument("-i", "--initrd", help="initramfs")
    p.add_argument("-p", "--params", help="appended to the kernel command line")
    p.add_argument("-m", "--mem", type=int, metavar="MiB", help="guest memory in MiB (default 256)")
    p.add_argument("-c", "--cpus", type=int, help="number of vCPUs (default 1)")
    p.add_argument("--name", help="the VM's name (logs, default serial numbers)")
    p.add_argument(
        "--virtio-transport",
        choices=("pci", "mmio"),
        help="pci (default: what stock x86 kernels find) or mmio (described through ACPI)",
    )
    p.add_argument(
        "--console-backend", metavar="SPEC", help="stdio (default), pty, socket:PATH, file:PATH, null"
    )
    p.add_argument(
        "--user",
        metavar="NAME",
        help="once the VM, its devices and the kernel are set up, become this user (vdm started as root)",
    )
    add_control_option(p)
    add_device_options(p, plugins)
    p.epilog = OPTION_SYNTAX_HELP


def _resolve(doc: dict[str, Any], base: str) -> dict[str, Any]:
    """The kernel and initrd of a VM file are relative to the file (device paths: device_configs)."""
    out = dict(doc)
    for key in ("kernel", "initrd"):
        if isinstance(out.get(key), str):
            out[key] = os.path.join(base, os.path.expanduser(out[key]))
    return out


def _default_console(args: argparse.Namespace, plugins: PluginSet, doc: dict[str, Any]) -> dict[str, Any]:
    """Give the guest a 16550 UART on ttyS0 when no console is asked for (as ``lkvm run`` does),
    and apply ``--console-backend`` to the consoles asked for on the command line or in the file."""
    backend = args.console_backend
    if "console" not in plugins.devices:
        if backend or getattr(args, "dev_console", None):
            raise UserError("--console needs the vdm-console plugin: pip install vdm-console")
        log.warning("no vdm-console plugin installed: the guest has no console (pip install vdm-console)")
        return doc
    cli = list(getattr(args, "dev_console", None) or [])
    tables = doc.get("console")
    if not cli and tables is None:
        cli = ["serial"]  # stdio unless --console-backend says otherwise
    if cli:
        args.dev_console = [f"{c},backend={backend}" if backend else c for c in cli]
        return doc
    if backend:  # the file's console tables, with the backend the command line chose
        rows = [tables] if isinstance(tables, dict) else tables
        if isinstance(rows, list) and all(isinstance(t, dict) for t in rows):
            return {**doc, "console": [{**t, "backend": backend} for t in rows]}
    return doc


def _guest_words(dev: Any, attr: str) -> str | None:
    """A device's ``guest_console`` or ``guest_params``: None or a string for the kernel command
    line. A plugin's value is not trusted: anything else stops ``vdm run`` with one line naming the
    device and what to fix, instead of a TypeError (or a command line the kernel misreads)."""
    try:
        value = getattr(dev, attr, None)
    except Exception as e:  # a property that raises
        raise UserError(f"device {getattr(dev, 'name', dev)!r}: its {attr} raised {e!r}; "
                        "fix or update its plugin") from None
    if value is None or value == "":
        return None
    if not isinstance(value, str) or any(c in value for c in "\0\n\r"):
        raise UserError(f"device {getattr(dev, 'name', dev)!r}: its {attr} is {value!r}, not one line of "
                        "kernel parameters (a str, or None); fix or update its plugin")
    return value


def run(args: argparse.Namespace) -> int:
    """Build and boot the VM; block until it ends."""
    plugins: PluginSet = args.plugin_set
    doc: dict[str, Any] = {}
    base_dir = None
    if args.vm_file:
        base_dir = os.path.dirname(os.path.abspath(args.vm_file))
        doc = _resolve(load_toml(args.vm_file), base_dir)
    kernel = args.kernel or doc.get("kernel") or default_kernel()
    if kernel is None:
        raise UserError(f"no kernel: give one with -k/--kernel (no /boot/vmlinuz-{platform.release()} here)")
    if not os.path.isfile(kernel):
        raise UserError(f"kernel {kernel}: no such file (give a bzImage with -k/--kernel)")
    initrd = args.initrd or doc.get("initrd")
    if initrd and not os.path.isfile(initrd):
        raise UserError(f"initrd {initrd}: no such file")
    mem = args.mem or int(doc.get("mem", 256))
    cpus = args.cpus or int(doc.get("cpus", 1))
    name = args.name or doc.get("name") or "vdm"
    transport = args.virtio_transport or doc.get("virtio_transport", "pci")
    if transport not in ("pci", "mmio"):
        raise UserError(f"virtio_transport must be pci or mmio, not {transport!r}")
    doc = _default_console(args, plugins, doc)
    configs = device_configs(args, plugins, doc, base_dir=base_dir)
    params = " ".join(p for p in (doc.get("params"), args.params) if p)
    if getattr(args, "control", None):
        check_control_path(args.control)

    from vdm.vmm import Vmm

    from .kvm import KvmError
    from .machine import Machine, MachineConfig, MachineError
    from .pci_bus import CONF1_PORT, CONF1_PORTS, PciBus
    from .vmm import KvmVmm

    # SIGTERM/SIGINT from here on stop the VM cleanly, whichever thread they land on (a vCPU's,
    # a device's); a second one during the shutdown (``timeout`` signals vdm, then its process
    # group) is ignored. Closing: the VMM's transports, the devices, then the VM.
    with StopSignal() as stop, DeviceSet() as devices:
        try:
            machine = Machine(MachineConfig(mem_mib=mem, cpus=cpus))
        except (KvmError, MachineError, OSError) as e:
            raise UserError(f"cannot create the VM: {e}") from None
        devices.hold(machine.close, "the VM")
        vmm = Vmm(KvmVmm(machine), name=name)
        devices.using(vmm.close, "the VMM")
        bus = PciBus()
        vmm.register_pio(CONF1_PORT, CONF1_PORTS, bus, "pci-conf1")
        console = None
        ctx = DeviceContext(vm_name=name, vmm=vmm)
        for dt, cfg in configs:
            dev = devices.create(dt, cfg, ctx)
            if isinstance(dev, VirtioDevice):
                if transport == "pci":
                    vmm.attach_pci(dev, bus)
                else:
                    t = vmm.attach_mmio(dev)
                    machine.add_virtio_mmio(t.base, MMIO_WINDOW_SIZE, t.irq_number, dev.name)
                console = console or _guest_words(dev, "guest_console")
            # a device's own kernel parameters (vdm-9p's root share), before the user's
            params = " ".join(p for p in (_guest_words(dev, "guest_params"), params) if p)
        cmdline = f"console={console or 'ttyS0'} {BASE_PARAMS} {params}".strip()
        try:
            machine.load_linux(kernel, initrd, cmdline)
        except (MachineError, ValueError, OSError) as e:
            raise UserError(f"cannot load {kernel}: {e}") from None
        log.info("%s: %d MiB, %d vCPU(s), %d device(s), %s", name, mem, cpus, len(devices.devices), cmdline)
        devices.serve_control(getattr(args, "control", None))
        user = getattr(args, "user", None) or doc.get("user")
        devices.ready(str(user) if user else None)
        exits: list[Any] = []

        def on_exit(end: Any) -> None:  # on a vCPU thread
            exits.append(end)
            stop.wake()

        machine.on_exit.append(on_exit)
        if not stop.stopped:
            machine.start()
        stop.wait(until=lambda: bool(exits))
        stopped_by = stop.stopped_by  # a signal during the shutdown below changes nothing
        end = machine.stop()  # joins the vCPUs; the first reason the VM ended for
    if stopped_by:  # as QEMU does: a VM ended from outside is not an error
        print(f"vdm: {name}: terminating on {stopped_by}", file=sys.stderr)
        return 0
    what = getattr(end, "reason", str(end))
    if what in ("poweroff", "reboot", "reset"):
        return 0
    print(f"vdm: guest stopped: {what} ({getattr(end, 'detail', '')})", file=sys.stderr)
    return 1
