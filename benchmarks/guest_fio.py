"""A guest-kit initramfs with one more workload, ``fio``: several fio jobs in one boot.

The kit's /init (scripts/guestkit/init.sh) runs one fio job per boot (``blkrand``). The benchmarks
need six (sequential 1 MiB read/write, 4 KiB random read/write at queue depth 1 and 32), so this
module writes an overlay cpio whose /init is the kit's init.sh plus a ``wl_fio`` function, and
appends it to the kit's ``initrd-fio.cpio`` (Linux unpacks concatenated archives in order, the later
/init wins). The kit itself (and its cache stamp) is left alone.

Guest parameter ``jobs``: ``rw:bs:iodepth`` specs joined by ``+`` (e.g. ``read:1m:8+randread:4k:1``),
``time``: seconds per job. Result keys: ``<rw>_<bs>_qd<iodepth>_iops`` and ``..._kibs``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "scripts" / "guestkit" / "init.sh"

WL_FIO = r'''
wl_fio() {  # several fio jobs on $P_dev: vdmtest.jobs=rw:bs:qd+...  (added by benchmarks/guest_fio.py)
  command -v fio >/dev/null || { result skip reason=no_fio_use_initrd-fio; return; }
  waitfor "$P_dev" || { result fail reason=no_dev dev="$P_dev"; return; }
  kv=
  for j in $(echo "$P_jobs" | tr + ' '); do
    rw=${j%%:*}; r=${j#*:}; bs=${r%%:*}; qd=${r#*:}
    o=$(fio --name=b --filename="$P_dev" --rw="$rw" --bs="$bs" --iodepth="$qd" --ioengine=libaio --direct=1 \
        --time_based --runtime="$P_time" --size=48m --minimal 2>&1 | tail -1)
    case $rw in *write*) bw=$(echo "$o" | cut -d';' -f48); io=$(echo "$o" | cut -d';' -f49);;
    *) bw=$(echo "$o" | cut -d';' -f7); io=$(echo "$o" | cut -d';' -f8);; esac
    case $io in ''|*[!0-9]*) result fail reason=fio job="$j" out="$(echo "$o" | tr ' ' _)"; return;; esac
    kv="$kv ${rw}_${bs}_qd${qd}_iops=$io ${rw}_${bs}_qd${qd}_kibs=$bw"
  done
  result ok $kv runtime_s="$P_time"
}
'''

DISPATCH = '|blkrand) "wl_$WL";;'  # the end of init.sh's workload case line


def init_text() -> str:
    """The kit's init.sh with the ``fio`` workload added."""
    text = INIT.read_text()
    if DISPATCH not in text or "\nfor WL in " not in text:
        raise RuntimeError(f"{INIT} changed: cannot add the fio workload")
    text = text.replace(DISPATCH, DISPATCH.replace("blkrand)", "blkrand|fio)"), 1)
    return text.replace("\nfor WL in ", WL_FIO + "\nfor WL in ", 1)


def fio_initrd(base: os.PathLike[str] | str, out: os.PathLike[str] | str) -> Path:
    """Write ``base`` followed by an overlay cpio holding the extended /init to ``out``."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as d:
        init = Path(d) / "init"
        init.write_text(init_text())
        init.chmod(0o755)
        overlay = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"init\n", cwd=d,
                                 stdout=subprocess.PIPE, check=True).stdout
    with open(out, "wb") as f:
        f.write(Path(base).read_bytes())
        f.write(overlay)
    return out
