"""kvm plugin of vdm: vdm creates and runs the VM on Linux KVM, like kvmtool's ``lkvm run``.

Pure Python over cffi's ABI mode (no compiler at install time). The layers, bottom up:

* :mod:`~vdm_kvm.kvm_abi` -- the KVM structures and ioctl numbers (checked against the kernel
  headers by tests/kvm/test_abi.py);
* :mod:`~vdm_kvm.kvm` -- ``Kvm`` (/dev/kvm), :mod:`~vdm_kvm.vm` -- ``Vm`` (memory slots, in-kernel
  irqchip and PIT, ``KVM_IRQ_LINE``, MSIs and GSI routes, ioeventfd, irqfd, the PIO/MMIO buses of
  :mod:`~vdm_kvm.bus`), :mod:`~vdm_kvm.vcpu` -- ``Vcpu`` (registers, CPUID, LAPIC, the ``KVM_RUN``
  thread), with :mod:`~vdm_kvm.exits` and :mod:`~vdm_kvm.ioctl` under them;
* the x86 platform and Linux boot: :mod:`~vdm_kvm.layout` (the guest-physical map),
  :mod:`~vdm_kvm.bootparams` (bzImage setup header, zero page), :mod:`~vdm_kvm.elf` (vmlinux),
  :mod:`~vdm_kvm.e820`, :mod:`~vdm_kvm.pagetables` (identity map, boot GDT),
  :mod:`~vdm_kvm.cpuid`, :mod:`~vdm_kvm.acpi` (AML encoder; RSDP/XSDT/FADT/MADT/DSDT),
  :mod:`~vdm_kvm.power` (ACPI sleep/reset ports, i8042 reset);
* :mod:`~vdm_kvm.machine` -- ``Machine``: all of the above put together, ``load_linux``, run;
* :mod:`~vdm_kvm.vmm` (vdm's VMM hooks on a Machine), :mod:`~vdm_kvm.run` (``vdm run``),
  :mod:`~vdm_kvm.plugin` (the entry point).

Nothing heavy is imported here: ``vdm list-plugins`` imports only :mod:`~vdm_kvm.plugin`.
"""
