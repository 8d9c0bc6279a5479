#!/usr/bin/env bash
# demo-guest.sh KITDIR WORKDIR — boot the guest kit with `vdm run`: a qcow2 disk, a tap network
# and the serial console on this terminal. Runs where /dev/kvm can boot Linux (directly on a host
# with kvm_intel/kvm_amd, or inside the KVM lab: scripts/demo.sh decides).
set -euo pipefail
KIT=$1 WORK=$2
mkdir -p "$WORK" && cd "$WORK"
rm -f demo.qcow2 && qemu-img create -q -f qcow2 demo.qcow2 64M
TAP=vdmdemo0
ip tuntap add dev $TAP mode tap 2>/dev/null || true
ip addr replace 10.0.2.2/24 dev $TAP && ip link set $TAP up
echo "demo: vdm run -k vmlinuz -i initrd -d demo.qcow2 -n mode=tap,tapif=$TAP -c 2 (guest output follows)"
set +e
vdm run -k "$KIT/vmlinuz" -i "$KIT/initrd.cpio.gz" -m 256 -c 2 --name demo \
  -d demo.qcow2 -n mode=tap,tapif=$TAP --console-backend stdio \
  -p "quiet vdmtest=boot,smp,blk,fs,net vdmtest.mib=8 vdmtest.fsmib=2 vdmtest.fsfiles=16 vdmtest.ip=10.0.2.2 vdmtest.exit=poweroff" </dev/null
rc=$?
set -e
echo "demo: vdm run exited with status $rc"
qemu-img check demo.qcow2
ip link del $TAP 2>/dev/null || true
exit $rc
