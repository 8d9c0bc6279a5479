"""vdm-net's virtio-net constants equal <linux/virtio_net.h> (feature bits, header, control queue)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from vdm_net import control, device, features, vnet_hdr

# (our module, our name, the header's name)
PAIRS = [
    *[(features, f"F_{n}", f"VIRTIO_NET_F_{n}") for n in (
        "CSUM", "GUEST_CSUM", "CTRL_GUEST_OFFLOADS", "MTU", "MAC", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN",
        "GUEST_UFO", "HOST_TSO4", "HOST_TSO6", "HOST_ECN", "HOST_UFO", "MRG_RXBUF", "STATUS", "CTRL_VQ",
        "CTRL_RX", "CTRL_VLAN", "CTRL_RX_EXTRA", "GUEST_ANNOUNCE", "MQ", "CTRL_MAC_ADDR")],
    *[(vnet_hdr, n, f"VIRTIO_NET_HDR_{n}") for n in (
        "F_NEEDS_CSUM", "F_DATA_VALID", "F_RSC_INFO", "GSO_NONE", "GSO_TCPV4", "GSO_UDP", "GSO_TCPV6",
        "GSO_ECN")],
    (vnet_hdr, "HDR_LEN", "sizeof(struct virtio_net_hdr_mrg_rxbuf)"),
    (control, "CTRL_OK", "VIRTIO_NET_OK"),
    (control, "CTRL_ERR", "VIRTIO_NET_ERR"),
    (device, "S_LINK_UP", "VIRTIO_NET_S_LINK_UP"),
    (control, "CLASS_RX", "VIRTIO_NET_CTRL_RX"),
    (control, "RX_PROMISC", "VIRTIO_NET_CTRL_RX_PROMISC"),
    (control, "RX_NOBCAST", "VIRTIO_NET_CTRL_RX_NOBCAST"),
    (control, "CLASS_MAC", "VIRTIO_NET_CTRL_MAC"),
    (control, "MAC_TABLE_SET", "VIRTIO_NET_CTRL_MAC_TABLE_SET"),
    (control, "MAC_ADDR_SET", "VIRTIO_NET_CTRL_MAC_ADDR_SET"),
    (control, "CLASS_VLAN", "VIRTIO_NET_CTRL_VLAN"),
    (control, "VLAN_ADD", "VIRTIO_NET_CTRL_VLAN_ADD"),
    (control, "VLAN_DEL", "VIRTIO_NET_CTRL_VLAN_DEL"),
    (control, "CLASS_MQ", "VIRTIO_NET_CTRL_MQ"),
    (control, "MQ_VQ_PAIRS_SET", "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET"),
    (control, "CLASS_GUEST_OFFLOADS", "VIRTIO_NET_CTRL_GUEST_OFFLOADS"),
    (control, "GUEST_OFFLOADS_SET", "VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET"),
    (device, "DEVICE_ID_NET", "VIRTIO_ID_NET"),
]


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read the kernel headers with (apt-get install gcc)")
    if not os.path.exists("/usr/include/linux/virtio_net.h"):
        pytest.skip("no <linux/virtio_net.h> (apt-get install linux-libc-dev)")
    d = tmp_path_factory.mktemp("vneth")
    lines = "\n".join(f'    printf("%lu\\n", (unsigned long)({c}));' for _, _, c in PAIRS)
    (d / "t.c").write_text(
        "#include <stdio.h>\n#include <linux/virtio_ids.h>\n#include <linux/virtio_net.h>\n"
        f"int main(void) {{\n{lines}\n    return 0;\n}}\n"
    )
    subprocess.run([cc, "-o", str(d / "t"), str(d / "t.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "t")], check=True, capture_output=True, text=True).stdout.split()
    return {c: int(v) for (_, _, c), v in zip(PAIRS, out)}


@pytest.mark.parametrize(("module", "ours", "theirs"), PAIRS, ids=[p[2] for p in PAIRS])
def test_constant_matches_the_header(header, module, ours, theirs):
    assert getattr(module, ours) == header[theirs]
