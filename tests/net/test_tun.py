"""The ioctl numbers and flags in vdm_net.backends.tun equal the ones in the installed Linux headers."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from vdm_net.backends import tun

NAMES = [
    "TUNSETIFF", "TUNGETFEATURES", "TUNSETOFFLOAD", "TUNGETIFF", "TUNGETVNETHDRSZ", "TUNSETVNETHDRSZ",
    "TUNSETQUEUE", "TUNSETVNETLE", "IFF_TAP", "IFF_NO_PI", "IFF_VNET_HDR", "IFF_MULTI_QUEUE",
    "IFF_ATTACH_QUEUE", "IFF_DETACH_QUEUE", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN",
    "TUN_F_UFO", "IFNAMSIZ",
]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read the kernel headers with (apt-get install gcc)")
    if not os.path.exists("/usr/include/linux/if_tun.h"):
        pytest.skip("no <linux/if_tun.h> (apt-get install linux-libc-dev)")
    d = tmp_path_factory.mktemp("tunh")
    prints = "\n".join(f'    printf("{n} %lu\\n", (unsigned long)({n}));' for n in NAMES)
    src = d / "t.c"
    src.write_text(
        "#include <stdio.h>\n#include <net/if.h>\n#include <sys/ioctl.h>\n#include <linux/if_tun.h>\n"
        f"int main(void) {{\n{prints}\n"
        '    printf("IFREQ_SIZE %zu\\n", sizeof(struct ifreq));\n    return 0;\n}\n'
    )
    exe = d / "t"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", [*NAMES, "IFREQ_SIZE"])
def test_constant_matches_the_kernel_header(header_values, name):
    assert getattr(tun, name) == header_values[name], f"{name}: ours 0x{getattr(tun, name):x}"


def test_ifreq_layout():
    req = tun.ifreq_flags("vdmtap0", tun.IFF_TAP | tun.IFF_NO_PI)
    assert len(req) == tun.IFREQ_SIZE
    assert tun.ifreq_name(req) == "vdmtap0"
    assert tun.ifreq_get_flags(req) == tun.IFF_TAP | tun.IFF_NO_PI
    with pytest.raises(ValueError):
        tun.ifreq_flags("x" * 16, 0)
