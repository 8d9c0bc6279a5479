#!/bin/bash
# run.sh [--build] DISK.img [dom0 kernel args...] — boot the Xen lab once under QEMU TCG:
# Xen 4.20 (IOREQ-enabled, ./build.sh) + Debian 13 arm64 dom0 whose /init (dom0-init.sh) runs
# `vdm dm-only` for a domU's virtio devices (blk, net, console, rng), relays its VDMTEST lines, and
# powers off. DISK.img is QEMU's virtio-blk disk of dom0 (/dev/vda there), the one vdm serves to the
# domU, so the host can check it afterwards. Output: the serial console on stdout ("XENLAB " lines).
# Env: XENLAB_DIR (default ~/.cache/vdm/xenlab), XENLAB_SMP (2), XENLAB_MEM (2G), XENLAB_DISK2 (a
# second image: dom0's disk with serial xenlab1, for benchmarks/xenlab_pv.py; DISK.img's is xenlab0).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB=${XENLAB_DIR:-$HOME/.cache/vdm/xenlab}
if [ "${1:-}" = --build ]; then shift; "$HERE/build.sh" "$LAB" >&2; fi
DISK=${1:?usage: $0 [--build] DISK.img [dom0 kernel args...]}; shift
DISK2=()
[ -n "${XENLAB_DISK2:-}" ] && DISK2=(-drive file="$XENLAB_DISK2",if=none,format=raw,id=d1,cache=unsafe
  -device virtio-blk-device,drive=d1,serial=xenlab1)
for f in xen Image dom0.cpio; do
  [ -s "$LAB/$f" ] || { echo "xenlab: $LAB/$f missing: run $HERE/build.sh first" >&2; exit 1; }
done
exec qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu cortex-a57 \
  -smp "${XENLAB_SMP:-2}" -m "${XENLAB_MEM:-2G}" -nographic -no-reboot -monitor none -serial stdio \
  -kernel "$LAB/xen" \
  -append "dom0_mem=768M,max:768M bootscrub=0 console=dtuart dom0_max_vcpus=${XENLAB_SMP:-2} loglvl=warning guest_loglvl=warning" \
  -device guest-loader,addr=0x49000000,kernel="$LAB/Image",bootargs="console=hvc0 quiet nowatchdog rdinit=/init $*" \
  -device guest-loader,addr=0x50000000,initrd="$LAB/dom0.cpio" \
  -drive file="$DISK",if=none,format=raw,id=d0,cache=unsafe -device virtio-blk-device,drive=d0,serial=xenlab0 \
  "${DISK2[@]}"
