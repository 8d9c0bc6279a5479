#!/usr/bin/env bash
# demo.sh — boot a Linux guest (Debian's kernel, a busybox initramfs) with `vdm run`: a vdm qcow2
# disk, a vdm network card on a tap, and the guest's console on this terminal. The guest writes and
# verifies data on the disk, makes a file system, pings the host through the tap, and powers off.
# Where /dev/kvm cannot boot Linux (kvm_pvm, or none), the demo runs inside the KVM lab: a QEMU TCG
# guest with a real, nested KVM (see scripts/kvmlab/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIT=$($PY tests/realguest/harness.py kit | sed -n 's/^dir: //p')
if $PY -c 'import sys; from vdm_kvm.plugin import check; sys.exit(check() is not None)'; then
  exec bash scripts/demo-guest.sh "$KIT" "${TMPDIR:-/tmp}/vdm-demo"
fi
echo "demo: $($PY -c 'from vdm_kvm.plugin import check; print(check())')"
echo "demo: running it in the KVM lab (about 2-3 minutes)"
exec scripts/kvmlab/run.sh --timeout 600 "bash $PWD/scripts/demo-guest.sh $KIT /mnt/demo"
