"""``vdm run`` guests in the KVM lab on NBD disks (issue 17 item 4), the servers started by the lab script.

One lab boot runs two guests, each next to a real NBD server the script starts in the lab (L2 mounts
the host's /, so Debian's qemu-nbd, nbdkit and libnbd are the host's):

- ``data``: qemu-nbd exports a 64 MiB raw file; ``vdm run -d 'nbd+unix:///?socket=...'``; the kit's
  ``blk`` workload writes 8 MiB of random data and reads it back; after vdm exits the script stops
  qemu-nbd and the test compares the file's first 8 MiB (md5 in the lab) with what the guest wrote.
- ``root``: nbdkit's file plugin exports an ext4 image holding the kit unpacked (tests.blk.rootdisk);
  the guest boots with ``root=/dev/vda rootfstype=ext4``, the kit's /init switch_roots to the disk and
  the ``rootdisk`` workload runs from it; the file it wrote there is read from the image with debugfs.
"""

from __future__ import annotations

import re
import shlex

import pytest
import vdm_lab

from tests.blk import rootdisk

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]

MIB = 8
T = "/mnt/tmp"


def _guest_lines(name: str, kit_dir: str, disk: str, params: str) -> list[str]:
    """vdm run once (once more when the L3 guest died before /init, as the other lab tests do)."""
    log = f"{T}/{name}.log"
    return [
        f"echo '=== BEGIN {name}'",
        "for attempt in 1 2; do",
        f"  timeout -k 10 600 vdm run -k {kit_dir}/vmlinux -i {kit_dir}/initrd.cpio.gz -m 256 -c 1 "
        f"-d {shlex.quote(disk)} --console serial -p {shlex.quote(params)} >{log} 2>&1 </dev/null; rc=$?",
        f"  cat {log}",
        f"  if [ $rc = 0 ] || grep -q 'VDMTEST INIT' {log}; then break; fi",
        f'  echo "=== RETRY {name}: attempt $attempt failed before /init (rc=$rc)"',
        "done",
        f'echo "=== END {name} rc=$rc"',
    ]


def _wait_sock(sock: str) -> str:
    return f"i=0; while [ ! -S {sock} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"


@pytest.fixture(scope="module")
def lab_run(kit: vdm_lab.GuestKit, kvm_lab) -> vdm_lab.LabResult:
    k = shlex.quote(str(kit.dir))
    data, dsock = f"{T}/data.img", f"{T}/data.sock"
    root, rsock, tree = f"{T}/root.img", f"{T}/root.sock", f"{T}/roottree"
    lines = [
        f"mkdir -p {T}",
        'echo "=== TOOLS $(command -v qemu-nbd nbdkit debugfs | tr "\\n" " ")"',
        # data: qemu-nbd, the blk workload
        f"truncate -s 64M {data}",
        f"qemu-nbd -f raw -t -k {dsock} {data} & srv=$!",
        _wait_sock(dsock),
        *_guest_lines("data", k, f"nbd+unix:///?socket={dsock}",
                      f"quiet vdmtest=boot,blk vdmtest.mib={MIB} vdmtest.exit=reboot"),
        "kill $srv; wait $srv",
        f'echo "=== DATA md5=$(dd if={data} bs=1M count={MIB} 2>/dev/null | md5sum | cut -c1-32)"',
        # root: nbdkit, the guest's / on the export
        "M=marker-$(od -An -tx1 -N8 /dev/urandom | tr -d ' \\n')",
        *rootdisk.tree_commands(str(kit.dir), tree, '"$M"'),
        *rootdisk.image_commands(tree, root),
        f"nbdkit -f -U {rsock} file {root} & srv=$!",
        _wait_sock(rsock),
        *_guest_lines("root", k, f"nbd+unix:///?socket={rsock}",
                      f"quiet vdmtest=boot,rootdisk vdmtest.exit=reboot {rootdisk.ROOT_PARAMS}"),
        "kill $srv; wait $srv",
        f'echo "=== GUESTMADE $(debugfs -R "cat /guestmade" {root} 2>/dev/null)"',
        f'echo "=== HOSTSIDE $M $(md5sum {tree}/bin/busybox | cut -c1-32)"',
    ]
    r = kvm_lab("\n".join(lines), timeout=1500)
    r.assert_ok()
    return r


def _guest(lab_run: vdm_lab.LabResult, name: str) -> tuple[str, dict[str, vdm_lab.WorkloadResult]]:
    out = lab_run.output
    m = re.search(f"=== BEGIN {name}\n(.*?)=== END {name} rc=(\\d+)", out, re.S)
    assert m, lab_run.describe()
    log, rc = m.group(1), int(m.group(2))
    for retry in re.findall(f"^=== RETRY {name}: .*$", out, re.M):
        print(f"\nKVM lab: {retry}")
    _, results, done = vdm_lab.parse_results(log)
    assert rc == 0 and done, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    return log, {x.name: x for x in results}


def _field(out: str, name: str) -> str:
    m = re.search(f"^=== {name} (.*)$", out, re.M)
    assert m, f"no '=== {name}' line"
    return m.group(1).strip()


def test_vdm_run_guest_writes_an_nbd_disk(lab_run: vdm_lab.LabResult) -> None:
    _, by = _guest(lab_run, "data")
    blk = by["blk"]
    assert by["boot"].ok and blk.ok and blk["readback"] == "match", blk.line
    # the export's file, read in the lab after qemu-nbd stopped, holds what the guest wrote
    data = _field(lab_run.output, "DATA")
    assert data == f"md5={blk['md5']}", "the export does not hold what the guest wrote"
    print(f"\nvdm run on qemu-nbd (nbd+unix): blk write {blk['seq_write_MiBps']} MiB/s, "
          f"read {blk['seq_read_MiBps']} MiB/s")


def test_vdm_run_boots_a_guest_whose_root_is_an_nbd_export(lab_run: vdm_lab.LabResult) -> None:
    log, by = _guest(lab_run, "root")
    assert rootdisk.rootdisk_line(log) == "VDMTEST ROOTDISK dev=/dev/vda fs=ext4 init=/init", log[-3000:]
    r = by["rootdisk"]
    assert r.ok and r["root"] == "/dev/vda:ext4", r.line
    host_marker, host_md5 = _field(lab_run.output, "HOSTSIDE").split()
    assert r["marker"] == host_marker, r.line
    assert _field(lab_run.output, "GUESTMADE") == f"rootdisk {host_marker} {host_md5}"
    print(f"\nvdm run, root on nbdkit's export: rootdisk result at {r['uptime_s']} s of guest uptime")
