"""The KVM userspace ABI for x86-64, declared once for cffi's ABI mode.

Everything vdm-kvm passes to or reads from ``/dev/kvm`` is declared here: the structures (as in
``<linux/kvm.h>`` and ``<asm/kvm.h>``), the ioctl request numbers (computed with the kernel's
``_IO``/``_IOR``/``_IOW``/``_IOWR`` encoding from the structure sizes, never written as magic
numbers) and the constants. ``tests/kvm/test_abi.py`` compiles a C program against the installed
kernel headers and checks every size, offset and request number here against it.

``ioctl`` is called through libc (``ffi.dlopen(None)``); cffi releases the GIL for the duration
of each call, so vCPU threads blocked in ``KVM_RUN`` run in parallel.

Where the declarations come from (:data:`SOURCE`): parsing :data:`CDEF` with ``ffi.cdef`` imports
pycparser and parses ~250 lines at every start (62 ms here, seconds in the KVM lab's TCG guest), so
``python3 -m vdm_kvm.abi_build`` (run by scripts/install.sh) writes ``_abi_cache.py`` next to this
file: cffi's out-of-line ABI-mode module, the same declarations already parsed. It is used
(``SOURCE == "cache"``) only when its :data:`DIGEST` equals :func:`cdef_digest` -- the same
declarations, the same cffi backend; a missing, stale or broken cache falls back to parsing the
declarations here (``SOURCE == "cdef"``). Invariant: either way ``ffi``/``FFI_FIXED`` hold exactly
:data:`CDEF`/:data:`FIXED_CDEF`.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any, Optional

__all__ = [
    "CACHE_MODULE", "CDEF", "C_FIXED", "FFI_FIXED", "FIXED_CDEF", "SOURCE", "C", "cdef_digest", "ffi",
    "ioctl_numbers", "load_declarations",
]

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;
typedef signed long long __s64;

int ioctl(int fd, unsigned long request, ...);
int pthread_kill(unsigned long thread, int sig);

/* <asm/kvm.h> */
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_lapic_state { char regs[1024]; };

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8  type;
    __u8  present, dpl, db, s, l, g, avl;
    __u8  unusable;
    __u8  padding;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    __u16 padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};

struct kvm_fpu {
    __u8  fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8  ftwx;
    __u8  pad1;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8  xmm[16][16];
    __u32 mxcsr;
    __u32 pad2;
};

struct kvm_msr_entry {
    __u32 index;
    __u32 reserved;
    __u64 data;
};

struct kvm_msrs {
    __u32 nmsrs;
    __u32 pad;
    struct kvm_msr_entry entries[];
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    __u32 padding[3];
};

struct kvm_cpuid2 {
    __u32 nent;
    __u32 padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_pic_state {
    __u8 last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll;
    __u8 special_mask, init_state, auto_eoi, rotate_on_auto_eoi, special_fully_nested_mode;
    __u8 init4, elcr, elcr_mask;
};

struct kvm_ioapic_state {
    __u64 base_address;
    __u32 ioregsel;
    __u32 id;
    __u32 irr;
    __u32 pad;
    __u64 redirtbl[24];
};

struct kvm_debug_exit_arch {
    __u32 exception;
    __u32 pad;
    __u64 pc;
    __u64 dr6;
    __u64 dr7;
};

/* <linux/kvm.h> */
struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_irq_level {
    union { __u32 irq; __s32 status; };
    __u32 level;
};

struct kvm_irqchip {
    __u32 chip_id;
    __u32 pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        struct kvm_ioapic_state ioapic;
    } chip;
};

struct kvm_pit_config {
    __u32 flags;
    __u32 pad[15];
};

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u8 padding1[6];
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct {
            __u8 direction;
            __u8 size;
            __u16 port;
            __u32 count;
            __u64 data_offset;
        } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct {
            __u64 phys_addr;
            __u8  data[8];
            __u32 len;
            __u8  is_write;
        } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct {
            __u32 type;
            __u32 ndata;
            union { __u64 flags; __u64 data[16]; };
        } system_event;
        char padding[256];
    };
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    union { char padding[2048]; } s;
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    __u8  pad[36];
};

struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };

struct kvm_irq_routing_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    union { __u32 pad; __u32 devid; };
};

struct kvm_irq_routing_entry {
    __u32 gsi;
    __u32 type;
    __u32 flags;
    __u32 pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        __u32 pad[8];
    } u;
};

struct kvm_irq_routing {
    __u32 nr;
    __u32 flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    __u8  pad[16];
};

struct kvm_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    __u32 flags;
    __u32 devid;
    __u8  pad[12];
};

struct kvm_signal_mask {
    __u32 len;
    __u8  sigset[];
};

struct kvm_mp_state { __u32 mp_state; };

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    __u8  pad[64];
};
"""

# The KVM_RUN hot path: libc's ioctl with a fixed (int, unsigned long, unsigned long) prototype.
# Calling a variadic function through a non-variadic prototype with integer arguments only is the
# same call on x86-64 (SysV), and cffi's fixed-signature calls are about twice as fast.
FIXED_CDEF = "int ioctl(int fd, unsigned long request, unsigned long arg);"

#: the pre-parsed declarations written by ``python3 -m vdm_kvm.abi_build``
CACHE_MODULE = "vdm_kvm._abi_cache"


def cdef_digest() -> str:
    """What a cache must have been built from: these declarations and this cffi backend."""
    import _cffi_backend

    text = "\0".join((CDEF, FIXED_CDEF, str(getattr(_cffi_backend, "__version__", "?"))))
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(module_name: str) -> Optional[tuple[Any, Any]]:
    """(ffi, ffi_fixed) of the cache module, or None when it is missing, stale or broken."""
    try:
        cache = importlib.import_module(module_name)
        if getattr(cache, "DIGEST", None) != cdef_digest():
            return None
        return cache.ffi, cache.ffi_fixed
    except Exception:  # absent (ImportError), or built by another cffi that cannot load it
        return None


def load_declarations(cache_module: str = CACHE_MODULE) -> tuple[Any, Any, str]:
    """``(ffi, ffi_fixed, source)``: the declarations from ``cache_module`` when it is current
    (source ``"cache"``), else parsed from :data:`CDEF` and :data:`FIXED_CDEF` (``"cdef"``)."""
    cached = _cached(cache_module)
    if cached is not None:
        return cached[0], cached[1], "cache"
    import cffi

    parsed, fixed = cffi.FFI(), cffi.FFI()
    parsed.cdef(CDEF)
    fixed.cdef(FIXED_CDEF)
    return parsed, fixed, "cdef"


#: the KVM ABI; :data:`SOURCE` says whether it came from the install-time cache or a parse
ffi, FFI_FIXED, SOURCE = load_declarations()
#: libc, for ``ioctl`` and ``pthread_kill``.
C = ffi.dlopen(None)
#: its errno is read by :func:`vdm_kvm.ioctl.fixed_errno`
C_FIXED = FFI_FIXED.dlopen(None)

# ---- ioctl request encoding (include/uapi/asm-generic/ioctl.h; x86 uses the generic layout) -----
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (
        size << _IOC_SIZESHIFT
    )


def _size(ctype: str) -> int:
    return ffi.sizeof(ctype)


KVMIO = 0xAE


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, KVMIO, nr, _size(ctype))


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, KVMIO, nr, _size(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, KVMIO, nr, _size(ctype))


# system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "__u64")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_IRQ_LINE_STATUS = _iowr(0x67, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_SET_SIGNAL_MASK = _iow(0x8B, "struct kvm_signal_mask")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)


def ioctl_numbers() -> dict[str, int]:
    """Every ioctl request number defined here, by its kernel name (for the header check)."""
    return {k: v for k, v in globals().items() if k.startswith("KVM_") and k.isupper() and isinstance(v, int)
            and k not in _NOT_IOCTLS}


# ---- constants --------------------------------------------------------------------------------
KVM_API_VERSION = 12

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122

# memory region flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# ioeventfd flags
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

# irqfd flags
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

# GSI routing entry types
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

# irqchips
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1

# cpuid entry flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

KVM_MAX_CPUID_ENTRIES = 256

_NOT_IOCTL_PREFIXES = (
    "KVM_EXIT_", "KVM_SYSTEM_EVENT_", "KVM_CAP_", "KVM_MEM_", "KVM_IOEVENTFD_FLAG", "KVM_IRQFD_FLAG",
    "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_", "KVM_PIT_", "KVM_CPUID_FLAG", "KVM_MAX_", "KVM_API_",
)
_NOT_IOCTLS = {name for name in list(globals()) if name.startswith(_NOT_IOCTL_PREFIXES)}
