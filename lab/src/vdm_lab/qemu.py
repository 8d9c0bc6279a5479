"""QEMU command lines for the guest kit, and running them: the host's QEMU or Debian 13's.

``run_qemu`` boots the kit under QEMU TCG (q35, ``-no-reboot``, serial on stdio) with the
devices its arguments add, optionally the author's additions (a :class:`~vdm_lab.layer.GuestSpec`),
and returns the :class:`~vdm_lab.results.GuestResult`. The ``*_args`` helpers build the device
arguments: QEMU's own virtio devices (the peer baseline) and vhost-user devices whose backend
(``vdm vhost-user``) listens on a socket; :func:`vhost_user_device_args` takes any QEMU
vhost-user device type (``vhost-user-rng-pci``, ``vhost-user-input-pci``...).

Two QEMUs: the host's (Debian 12: 7.2) and Debian 13's (10.0) from the root
:mod:`vdm_lab.debian13` makes; ``run_qemu(..., qemu=debian13_qemu(), visible=[tmp_path])`` boots
the kit under QEMU 10 with the kit and ``visible`` bind-mounted at their own paths.

Some QEMU vhost-user device types need KVM: QEMU 7.2's ``vhost-user-input-pci`` refuses TCG
("requires kvm"); boot those with ``accel="kvm"`` in the KVM lab (:mod:`vdm_lab.kvmlab`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from . import debian13
from .kit import GuestKit, guestkit
from .layer import GuestSpec, initrd_with
from .process import run_logged
from .results import GuestResult, kernel_cmdline, parse_results

__all__ = [
    "NEEDS_KVM",
    "QEMU",
    "VHOST_USER_DEVICES",
    "QemuFrontend",
    "Qmp",
    "QmpError",
    "debian13_qemu",
    "host_qemu",
    "qemu_binary",
    "qemu_command",
    "run_qemu",
    "shared_memory_args",
    "user_net_args",
    "vhost_user_blk_args",
    "vhost_user_device_args",
    "vhost_user_device_for",
    "vhost_user_net_args",
    "virtio_blk_args",
]

QEMU = "qemu-system-x86_64"


def qemu_binary() -> str | None:
    """The path of qemu-system-x86_64, or None."""
    return shutil.which(QEMU)


@dataclasses.dataclass(frozen=True)
class QemuFrontend:
    """One QEMU to boot the kit with: the host's (Debian 12: 7.2) or Debian 13's (10.0, in its root).

    ``name`` goes into test ids ("qemu7.2", "qemu10.0"); ``version`` is the full one (10.0.13).
    ``argv(visible)`` is the command prefix to pass as run_qemu's ``qemu``: for the Debian 13 QEMU
    the host paths its arguments name (kit, images, socket directories) must be listed in ``visible``.
    """

    name: str
    version: str
    root: debian13.Debian13Root | None = None

    def argv(self, visible: Iterable[os.PathLike[str] | str] = ()) -> list[str]:
        if self.root is None:
            return [QEMU]
        return self.root.command([QEMU], visible)

    def __str__(self) -> str:
        where = f" from the Debian 13 root {self.root.dir}" if self.root else " (host)"
        return f"QEMU {self.version}{where}"


def host_qemu() -> QemuFrontend | None:
    """The host's qemu-system-x86_64 as a QemuFrontend, or None when it is not installed."""
    path = qemu_binary()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)(\.\d+)?", out)
    version = m.group(0).split()[1] if m else "?"
    return QemuFrontend(f"qemu{m.group(1)}.{m.group(2)}" if m else "qemu?", version)


def debian13_qemu() -> QemuFrontend:
    """Debian 13's QEMU (10.0); builds the root on first use. Raises debian13.Debian13Error."""
    root = debian13.build()
    major_minor = ".".join(root.qemu_version.split(".")[:2])
    return QemuFrontend(f"qemu{major_minor}", root.qemu_version, root)


def virtio_blk_args(image: os.PathLike[str] | str, index: int = 0, fmt: str = "raw",
                    cache: str = "none") -> list[str]:
    """QEMU's built-in virtio-blk-pci on a host image (the peer baseline).

    ``cache="none"`` (O_DIRECT, aio=native) is what the figures use; tmpfs (the KVM lab's /mnt)
    has no O_DIRECT, use ``cache="writeback"`` there.
    """
    aio = ",aio=native" if cache == "none" else ""
    return [
        "-drive", f"id=vblk{index},file={image},format={fmt},if=none,cache={cache}{aio}",
        "-device", f"virtio-blk-pci,drive=vblk{index}",
    ]


def shared_memory_args(memory_mib: int) -> list[str]:
    """Guest RAM in a shareable memfd, as vhost-user needs (run_qemu adds it by itself)."""
    return ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"]


def vhost_user_blk_args(socket_path: os.PathLike[str] | str, index: int = 0,
                        num_queues: int | None = None) -> list[str]:
    """A vhost-user-blk-pci device whose backend listens on ``socket_path``."""
    dev = f"vhost-user-blk-pci,chardev=vub{index}"
    if num_queues is not None:
        dev += f",num-queues={num_queues}"
    return ["-chardev", f"socket,id=vub{index},path={socket_path}", "-device", dev]


def vhost_user_net_args(socket_path: os.PathLike[str] | str, index: int = 0,
                        mac: str | None = None) -> list[str]:
    """A virtio-net-pci device on a vhost-user netdev whose backend listens on ``socket_path``."""
    dev = f"virtio-net-pci,netdev=vun{index}"
    if mac:
        dev += f",mac={mac}"
    return [
        "-chardev", f"socket,id=vunc{index},path={socket_path}",
        "-netdev", f"vhost-user,id=vun{index},chardev=vunc{index}",
        "-device", dev,
    ]


def user_net_args(index: int = 0, mac: str | None = None) -> list[str]:
    """QEMU's built-in virtio-net-pci on user networking (the host is 10.0.2.2 from the guest)."""
    dev = f"virtio-net-pci,netdev=unet{index}"
    if mac:
        dev += f",mac={mac}"
    return ["-netdev", f"user,id=unet{index}", "-device", dev]


#: QEMU's vhost-user device types by virtio device id (virtio 1.2 section 5); net (1) is a
#: netdev instead (vhost_user_net_args). QEMU has no generic vhost-user PCI device in 7.2 or 10.0.
VHOST_USER_DEVICES = {
    2: "vhost-user-blk-pci", 4: "vhost-user-rng-pci", 8: "vhost-user-scsi-pci", 16: "vhost-user-gpu-pci",
    18: "vhost-user-input-pci", 19: "vhost-user-vsock-pci", 25: "vhost-user-snd-pci", 26: "vhost-user-fs-pci",
    34: "vhost-user-i2c-pci", 41: "vhost-user-gpio-pci",
}
#: Types QEMU refuses under TCG (QEMU 7.2: "vhost initialization failed: requires kvm"): boot them
#: with ``accel="kvm"`` in the KVM lab.
NEEDS_KVM = frozenset({"vhost-user-input-pci"})


def vhost_user_device_for(virtio_id: int) -> str | None:
    """QEMU's vhost-user PCI device type for a virtio device id, or None when QEMU has none."""
    return VHOST_USER_DEVICES.get(virtio_id)


def vhost_user_device_args(device: str, socket_path: os.PathLike[str] | str, index: int = 0,
                           properties: Mapping[str, object] | None = None) -> list[str]:
    """Any QEMU vhost-user device (``device``: e.g. ``vhost-user-rng-pci``) on ``socket_path``.

    ``properties`` become ``,key=value`` on the ``-device`` argument.
    """
    if not re.match(r"^[a-z0-9-]+$", device):
        raise ValueError(f"bad QEMU device type {device!r}")
    dev = f"{device},chardev=vudev{index}"
    for k, v in (properties or {}).items():
        dev += f",{k}={v}"
    return ["-chardev", f"socket,id=vudev{index},path={socket_path}", "-device", dev]


def _has_machine(args: Sequence[str]) -> bool:
    return any(a in ("-M", "-machine") for a in args)


def qemu_command(
    extra_args: Sequence[str] = (),
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    *,
    kit: GuestKit,
    memory_mib: int | None = None,
    cpus: int = 1,
    initrd: str | os.PathLike[str] = "initrd",
    kernel: os.PathLike[str] | str | None = None,
    shared_memory: bool | None = None,
    append: str = "",
    accel: str = "tcg",
    qemu: str | Sequence[str] = QEMU,
) -> list[str]:
    """The qemu-system-x86_64 command line run_qemu uses (see there)."""
    if isinstance(initrd, str) and initrd in ("initrd", "fio"):
        initrd_path: os.PathLike[str] | str = kit.initrd if initrd == "initrd" else kit.initrd_fio
    else:
        initrd_path = initrd
    if memory_mib is None:
        memory_mib = 512 if initrd == "fio" else 256
    extra = list(extra_args)
    if shared_memory is None:
        shared_memory = any("vhost-user" in a for a in extra)
    cpu = "max" if accel.startswith("tcg") else "host"
    prefix = [qemu] if isinstance(qemu, str) else list(qemu)
    cmd = [*prefix, "-accel", accel, "-cpu", cpu, "-smp", str(cpus), "-m", f"{memory_mib}M",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]
    if shared_memory:
        cmd += shared_memory_args(memory_mib)
    if not _has_machine(extra):
        cmd += ["-M", "q35,memory-backend=mem" if shared_memory else "q35"]
    cmd += ["-kernel", str(kernel or kit.vmlinux), "-initrd", str(initrd_path),
            "-append", kernel_cmdline(workloads, params, append)]
    return cmd + extra


def run_qemu(
    extra_args: Sequence[str] = (),
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    timeout: float = 120,
    *,
    kit: GuestKit | None = None,
    memory_mib: int | None = None,
    cpus: int = 1,
    initrd: str | os.PathLike[str] = "initrd",
    kernel: os.PathLike[str] | str | None = None,
    shared_memory: bool | None = None,
    append: str = "",
    on_line: Callable[[str], None] | None = None,
    accel: str = "tcg",
    qemu: str | Sequence[str] | QemuFrontend = QEMU,
    visible: Iterable[os.PathLike[str] | str] = (),
    guest: GuestSpec | None = None,
) -> GuestResult:
    """Boot the kit under QEMU TCG (q35, ``-no-reboot``, serial on stdio) and collect its results.

    ``extra_args`` adds devices (``virtio_blk_args``, ``vhost_user_blk_args``, ...); guest RAM is put
    in a shared memfd (``-M q35,memory-backend=mem``) when an argument mentions vhost-user or
    ``shared_memory`` is true. ``initrd`` is "initrd", "fio" (with fio) or a path; memory defaults
    to 256 MiB, 512 with "fio". The kernel is the
    kit's vmlinux (QEMU boots its PVH entry: no decompression under TCG, about 6 s faster than the
    bzImage) unless ``kernel`` names another. ``on_line`` sees
    every serial line as it arrives. QEMU is killed after ``timeout`` seconds (then ``timed_out``).
    ``accel="kvm"`` (with ``-cpu host``) is for the KVM lab, where /dev/kvm is kvm_amd.
    ``qemu`` is the program, a command prefix or a QemuFrontend (QEMU 10 in Debian 13's root: the
    kit is made visible to it, and ``visible`` names the other host paths the arguments use).
    ``guest`` adds the author's modules, workloads and files (:class:`~vdm_lab.layer.GuestSpec`)
    to the chosen initrd for this run.
    """
    kit = kit or guestkit()
    with tempfile.TemporaryDirectory(prefix="vdmlab-initrd-") as tmp:
        if guest:
            if isinstance(initrd, str) and initrd in ("initrd", "fio"):
                if memory_mib is None:
                    memory_mib = 512 if initrd == "fio" else 256
                base: os.PathLike[str] | str = kit.initrd if initrd == "initrd" else kit.initrd_fio
            else:
                base = initrd
            initrd = initrd_with(kit, guest, Path(tmp) / "initrd", base)
            visible = [*visible, tmp]
        label = ""
        if isinstance(qemu, QemuFrontend):
            label = str(qemu)
            qemu = qemu.argv([kit.dir, *visible])
        cmd = qemu_command(extra_args, workloads, params, kit=kit, memory_mib=memory_mib, cpus=cpus,
                           initrd=initrd, kernel=kernel, shared_memory=shared_memory, append=append,
                           accel=accel, qemu=qemu)
        log, rc, timed_out, elapsed = run_logged(cmd, timeout, on_line)
    init, results, done = parse_results(log)
    return GuestResult(cmd, log, rc, timed_out, elapsed, init, results, done, label)


class Qmp:
    """A small QMP client on a Unix socket (QEMU started with ``-qmp unix:PATH,server=on,wait=off``).

    ``execute`` sends one command and returns its ``return`` value (events in between are kept in
    ``events``); a QMP error raises :class:`QmpError` with QEMU's description.
    """

    def __init__(self, path: os.PathLike[str] | str, timeout: float = 30) -> None:
        import json
        import socket

        self._json = json
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self._file = self.sock.makefile("rb")
        self.events: list[dict] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP: QEMU closed the monitor")
        return self._json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(self._json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error."""


