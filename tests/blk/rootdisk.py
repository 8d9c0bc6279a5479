"""A guest's ROOT filesystem on a vdm disk: an ext4 image made by the test, booted with ``root=/dev/vda``.

The image holds the guest kit's initramfs unpacked (busybox and the kit's /init), a marker file and
one author workload, ``rootdisk``. The kit's /init in the initramfs finds ``root=/dev/vda
rootfstype=ext4`` on the kernel command line, mounts the disk and ``switch_root``s to the /init on
it, which runs the workloads from the disk. ``rootdisk`` reports what / is (device and type) and the
marker it read there, and writes ``/guestmade`` (the marker and busybox's md5); the host reads that
file back from the image afterwards with ``debugfs`` (not through vdm or a mount).

Invariant: the marker is random per image, so a guest that reports it read it from this disk.
"""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
from pathlib import Path

#: the kernel command line that makes the kit's /init boot from the disk
ROOT_PARAMS = "root=/dev/vda rootfstype=ext4 rw"

#: the workload the disk's /init runs (sourced by the kit's /init in a subshell, ``result`` given)
ROOTDISK_WORKLOAD = r"""fs=$(awk '$2 == "/" {s = $1; t = $3} END {print s ":" t}' /proc/mounts)
echo "rootdisk $(cat /marker) $(md5sum /bin/busybox | cut -c1-32)" >/guestmade && sync
[ "$fs" = /dev/vda:ext4 ] && st=ok || st=fail
result $st root=$fs marker=$(cat /marker)
"""


def tree_commands(kit_dir: str, tree: str, marker: str) -> list[str]:
    """Shell lines that fill ``tree`` with the kit unpacked, ``marker`` (a shell word, expanded by the
    shell: ``"$M"`` works) in /marker and the workload."""
    k, t = shlex.quote(kit_dir), shlex.quote(tree)
    return [
        f"mkdir -p {t}/workloads && (cd {t} && gzip -dc {k}/initrd.cpio.gz | cpio -idm --quiet)",
        f"echo {marker} >{t}/marker",
        f"cat >{t}/workloads/rootdisk <<'VDM_EOF'\n{ROOTDISK_WORKLOAD}VDM_EOF",
    ]


def image_commands(tree: str, image: str, mib: int = 64) -> list[str]:
    """Shell lines that make ``image`` (raw ext4, ``mib`` MiB) from ``tree`` (after tree_commands)."""
    return [f"mkfs.ext4 -q -F -L vdmroot -d {shlex.quote(tree)} {shlex.quote(image)} {mib}M >/dev/null"]


def make_root_image(kit_dir: Path, work: Path, mib: int = 64) -> tuple[Path, str]:
    """Make ``work``/root.img here (raw ext4); returns it and its marker."""
    marker = f"marker-{secrets.token_hex(8)}"
    tree, image = work / "roottree", work / "root.img"
    script = "\n".join(["set -e", *tree_commands(str(kit_dir), str(tree), marker),
                        *image_commands(str(tree), str(image), mib)])
    subprocess.run(["sh", "-c", script], check=True)
    return image, marker


def guestmade(image: Path) -> str:
    """The guest's /guestmade as the ext4 image holds it, read with debugfs (no mount, no vdm)."""
    r = subprocess.run(["debugfs", "-R", "cat /guestmade", str(image)], capture_output=True, text=True)
    return r.stdout.strip()


def host_busybox_md5(tree: Path) -> str:
    """busybox's md5 as the host put it in the image's tree."""
    out = subprocess.run(["md5sum", str(tree / "bin" / "busybox")], capture_output=True, text=True)
    return out.stdout[:32]


def rootdisk_line(log: str) -> str | None:
    """The kit /init's line saying it switched to the disk root, if it did."""
    m = re.search(r"^VDMTEST ROOTDISK [^\r\n]*", log, re.M)  # a serial console's lines end in \r\n
    return m.group(0) if m else None
