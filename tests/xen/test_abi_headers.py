"""vdm_xen.abi's declarations, compiled against Debian's libxen-dev headers.

A C file is generated from the *same* cffi declarations the bindings use: one function pointer per
declared function, initialised with the header's function (``-Werror`` turns any parameter or result
type mismatch into a compile error), plus ``offsetof``/``sizeof`` of ``struct ioreq`` and the
bitfield byte of a real ``struct ioreq`` with state/data_is_ptr/dir/df set. The program's output is
compared with what cffi (ABI mode) and :func:`vdm_xen.abi.make_flags` say.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest
from vdm_xen import abi
from vdm_xen.bindings import declared_functions

HEADERS = (
    "xendevicemodel.h",
    "xenforeignmemory.h",
    "xenevtchn.h",
    "xengnttab.h",
    "xenstore.h",
    "xentoollog.h",
)

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc"),
    pytest.mark.skipif(
        not all(os.path.exists(f"/usr/include/{h}") for h in HEADERS),
        reason="needs Xen's development headers (apt-get install libxen-dev)",
    ),
]

LINK = ("-lxendevicemodel", "-lxenforeignmemory", "-lxenevtchn", "-lxengnttab", "-lxenstore", "-lxentoollog")
FIELDS = ("addr", "data", "count", "size", "vp_eport", "_pad0", "type")


def _c_source() -> str:
    lines = [
        "#define __XEN_TOOLS__ 1",
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <stdbool.h>",
        "#include <string.h>",
        *(f"#include <{h}>" for h in HEADERS),
        "#include <xen/hvm/ioreq.h>",
        "#include <xen/hvm/dm_op.h>",
        "#include <xen/memory.h>",
        "#include <xen/io/xenbus.h>",
    ]
    n = 0
    for soname, decls in abi.LIBRARIES.items():
        if soname.startswith("libc."):
            continue
        parts = [d for d in decls.split(";") if "(" in d]
        for name, decl in zip(declared_functions(soname), parts):
            # the very text given to ffi.cdef, turned into a pointer initialised with the header's function
            pointer = " ".join(decl.split()).replace(f"{name}(", f"(*check_{n})(", 1)
            lines.append(f"{pointer} = &{name};")
            n += 1
    lines.append("int main(void) {")
    for f in FIELDS:
        lines.append(f'  printf("off {f} %zu\\n", offsetof(struct ioreq, {f}));')
    lines.append('  printf("size ioreq %zu\\n", sizeof(struct ioreq));')
    lines.append('  printf("size xen_pfn_t %zu\\n", sizeof(xen_pfn_t));')
    lines.append('  printf("size domid_t %zu\\n", sizeof(domid_t));')
    lines.append('  printf("size ioservid_t %zu\\n", sizeof(ioservid_t));')
    lines.append('  printf("size evtchn_port_t %zu\\n", sizeof(evtchn_port_t));')
    for state, ptr, dir_, df in itertools.product(range(4), (0, 1), (0, 1), (0, 1)):
        lines.append(
            "  { struct ioreq r; memset(&r, 0, sizeof r); "
            f"r.state = {state}; r.data_is_ptr = {ptr}; r.dir = {dir_}; r.df = {df}; "
            f'printf("flags {state} {ptr} {dir_} {df} %u\\n", ((unsigned char *)&r)[30]); }}'
        )
    consts = {
        "STATE_IOREQ_NONE": abi.STATE_IOREQ_NONE,
        "STATE_IOREQ_READY": abi.STATE_IOREQ_READY,
        "STATE_IOREQ_INPROCESS": abi.STATE_IOREQ_INPROCESS,
        "STATE_IORESP_READY": abi.STATE_IORESP_READY,
        "IOREQ_TYPE_PIO": abi.IOREQ_TYPE_PIO,
        "IOREQ_TYPE_COPY": abi.IOREQ_TYPE_COPY,
        "IOREQ_TYPE_PCI_CONFIG": abi.IOREQ_TYPE_PCI_CONFIG,
        "IOREQ_TYPE_TIMEOFFSET": abi.IOREQ_TYPE_TIMEOFFSET,
        "IOREQ_TYPE_INVALIDATE": abi.IOREQ_TYPE_INVALIDATE,
        "IOREQ_READ": abi.IOREQ_READ,
        "IOREQ_WRITE": abi.IOREQ_WRITE,
        "HVM_IOREQSRV_BUFIOREQ_OFF": abi.HVM_IOREQSRV_BUFIOREQ_OFF,
        "XENMEM_resource_ioreq_server": abi.XENMEM_resource_ioreq_server,
        "XENMEM_resource_ioreq_server_frame_ioreq(0)": abi.XENMEM_resource_ioreq_server_frame_ioreq(0),
        "XENMEM_resource_ioreq_server_frame_bufioreq": abi.XENMEM_resource_ioreq_server_frame_bufioreq,
        "XS_WATCH_PATH": abi.XS_WATCH_PATH,
        "XS_WATCH_TOKEN": abi.XS_WATCH_TOKEN,
        "XBT_NULL": abi.XBT_NULL,
        "XTL_CRITICAL": 9,
        "XenbusStateInitialising": abi.XENBUS_STATE_INITIALISING,
        "XenbusStateInitWait": abi.XENBUS_STATE_INITWAIT,
        "XenbusStateClosing": abi.XENBUS_STATE_CLOSING,
        "XenbusStateClosed": abi.XENBUS_STATE_CLOSED,
    }
    for name, value in consts.items():
        lines.append(f'  printf("const {name} %lld {value}\\n", (long long)({name}));')
    lines.append("  return 0;\n}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("abi")
    src = d / "check.c"
    src.write_text(_c_source())
    exe = d / "check"
    r = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-variable", "-o", str(exe), str(src), *LINK],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"the declarations do not match the headers:\n{r.stderr[-4000:]}"
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()


def test_every_declared_function_matches_its_header_prototype(header_facts: list[str]) -> None:
    # compiling at all is the proof (-Werror on incompatible pointer types); make sure nothing was left out
    src = _c_source()
    for soname in abi.LIBRARIES:
        if soname.startswith("libc."):
            continue
        for name in declared_functions(soname):
            assert f"= &{name};" in src


def test_ioreq_layout_matches_the_header(header_facts: list[str]) -> None:
    facts = dict(line.rsplit(" ", 1) for line in header_facts if line.startswith(("off ", "size ")))
    for f in FIELDS:
        assert int(facts[f"off {f}"]) == abi.ffi.offsetof("ioreq_t", f), f
    assert int(facts["size ioreq"]) == abi.ffi.sizeof("ioreq_t") == 32
    assert int(facts["size xen_pfn_t"]) == abi.ffi.sizeof("xen_pfn_t")
    assert int(facts["size domid_t"]) == abi.ffi.sizeof("domid_t")
    assert int(facts["size ioservid_t"]) == abi.ffi.sizeof("ioservid_t")
    assert int(facts["size evtchn_port_t"]) == abi.ffi.sizeof("evtchn_port_t")
    assert abi.ffi.offsetof("ioreq_t", "flags") == abi.IOREQ_FLAGS_OFFSET == 30


def test_bitfield_byte_matches_gcc(header_facts: list[str]) -> None:
    lines = [ln.split() for ln in header_facts if ln.startswith("flags ")]
    assert len(lines) == 32
    for _, state, ptr, dir_, df, byte in lines:
        s, p, d, f, b = int(state), int(ptr), int(dir_), int(df), int(byte)
        assert abi.make_flags(s, p, d, f) == b
        assert (abi.flags_state(b), abi.flags_data_is_ptr(b), abi.flags_dir(b), abi.flags_df(b)) == (
            s,
            p,
            d,
            f,
        )
    assert abi.make_flags(3, 0, 1, 0) == 0x23  # the byte measured in xen-notes.md


def test_constants_match_the_headers(header_facts: list[str]) -> None:
    consts = [ln.split() for ln in header_facts if ln.startswith("const ")]
    assert len(consts) == 23
    for _, name, header_value, ours in consts:
        assert int(header_value) == int(ours), name
