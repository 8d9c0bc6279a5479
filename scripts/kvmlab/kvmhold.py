"""Hold KVM's run-time static keys on for the whole lab session (runs in L2, started by l2-init.sh).

Creating the first VM on a host turns on static keys that sit in the hottest kernel code: KVM's
preempt notifiers in __schedule, the LAPIC keys, the no-LAPIC-vCPU key. Turning one on or off
patches kernel text on every CPU (int3 first, then the new bytes). Under QEMU's multi-threaded
TCG that patching sometimes leaves both L2 CPUs looping on a stale int3 in __schedule forever
(seen in the lab: one vCPU at __schedule+0x2ab, the other in exc_int3, interrupts off, no
progress). Every test VM's create and destroy flipped those keys; with this process holding a VM
with an in-kernel LAPIC vCPU and a VM with a userspace-irqchip vCPU, they stay on and no test
patches __schedule again.

Standard library only; prints one ``VDMLAB HOLD`` line, creates /dev/shm/vdmlab-kvmhold, then
sleeps until L2 powers off.
"""

import fcntl
import os
import sys
import time

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60


def main() -> int:
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        with_lapic = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)  # preempt notifiers
        fcntl.ioctl(with_lapic, KVM_CREATE_IRQCHIP, 0)
        fcntl.ioctl(with_lapic, KVM_CREATE_VCPU, 0)  # apic_hw_disabled, apic_sw_disabled
        without = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fcntl.ioctl(without, KVM_CREATE_VCPU, 0)  # kvm_has_noapic_vcpu
    except OSError as e:
        print(f"VDMLAB HOLD failed={e.strerror or e}".replace(" ", "_"), flush=True)
        return 1
    print("VDMLAB HOLD ok", flush=True)
    with open("/dev/shm/vdmlab-kvmhold", "w"):  # l2-init.sh waits for it before the script
        pass
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
