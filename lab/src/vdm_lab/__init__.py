"""vdm-lab: boot real Linux guests against vdm devices -- the guest kit, QEMU TCG and the KVM lab.

The **guest kit** (:mod:`vdm_lab.kit`) is a Debian kernel plus a busybox initramfs whose /init
runs workloads named on the kernel command line and prints one ``VDMTEST RESULT`` line per
workload (:mod:`vdm_lab.results`). An author adds kernel modules, workload scripts and files of
their own with a :class:`GuestSpec` (:mod:`vdm_lab.layer`). The guest boots under QEMU TCG with
a vhost-user device served by ``vdm vhost-user`` (:class:`VhostUserBackend` starts it;
:func:`run_qemu`, :mod:`vdm_lab.qemu`), or under
``vdm run`` on KVM -- here or in the **KVM lab**, a QEMU guest with a nested /dev/kvm
(:func:`run_vdm`, :func:`run_in_kvm_lab`); :mod:`vdm_lab.labsession` lets many scripts share one
lab boot, each in namespaces of its own. Typical use::

    import vdm_lab

    kit = vdm_lab.guestkit()
    spec = vdm_lab.GuestSpec(modules=["virtio_input"],
                             workloads={"keys": "result ok n=$(ls /dev/input | wc -l)"})
    r = vdm_lab.run_qemu(vdm_lab.vhost_user_device_args("vhost-user-rng-pci", sock), ["rng", "keys"],
                         kit=kit, guest=spec, timeout=300)
    r.assert_ok("rng")
    assert r["rng"]["rng"] == "virtio_rng.0"

The standard library is all it needs (pytest only for :mod:`vdm_lab.pytest_support`).
"""

from __future__ import annotations

from . import debian13, labsession, labwatch
from .kit import GuestKit, GuestKitError, guestkit, kit_dir
from .kvmlab import LabResult, lab_command, parse_lab_console, run_in_kvm_lab
from .labqemu import run_qemu_in_kvm_lab
from .layer import GuestSpec, LayerError, initrd_with, layer_bytes, resolve_modules
from .qemu import (
    NEEDS_KVM,
    QEMU,
    VHOST_USER_DEVICES,
    QemuFrontend,
    Qmp,
    QmpError,
    debian13_qemu,
    host_qemu,
    qemu_binary,
    qemu_command,
    run_qemu,
    shared_memory_args,
    user_net_args,
    vhost_user_blk_args,
    vhost_user_device_args,
    vhost_user_device_for,
    vhost_user_net_args,
    virtio_blk_args,
)
from .results import VALUE_RE, GuestResult, WorkloadResult, kernel_cmdline, parse_keyvalues, parse_results
from .vdmrun import kvm_usable, run_vdm, vdm_run_command
from .vhostuser import VhostUserBackend

__version__ = "0.1.0"

__all__ = [
    "NEEDS_KVM",
    "QEMU",
    "VALUE_RE",
    "VHOST_USER_DEVICES",
    "GuestKit",
    "GuestKitError",
    "GuestResult",
    "GuestSpec",
    "LabResult",
    "LayerError",
    "QemuFrontend",
    "Qmp",
    "QmpError",
    "VhostUserBackend",
    "WorkloadResult",
    "debian13",
    "debian13_qemu",
    "guestkit",
    "host_qemu",
    "initrd_with",
    "kernel_cmdline",
    "kit_dir",
    "kvm_usable",
    "lab_command",
    "labsession",
    "labwatch",
    "layer_bytes",
    "parse_keyvalues",
    "parse_lab_console",
    "parse_results",
    "qemu_binary",
    "qemu_command",
    "resolve_modules",
    "run_in_kvm_lab",
    "run_qemu",
    "run_qemu_in_kvm_lab",
    "run_vdm",
    "shared_memory_args",
    "user_net_args",
    "vdm_run_command",
    "vhost_user_blk_args",
    "vhost_user_device_args",
    "vhost_user_device_for",
    "vhost_user_net_args",
    "virtio_blk_args",
]
