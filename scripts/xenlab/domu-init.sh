#!/bin/sh
# /init of the Xen lab's domU: a shell on the virtio console for dom0 to type into, then the guest
# kit's init (/init.kit: modules, the vdmtest= workloads, VDMTEST lines on hvc0 = Xen's PV console).
# The virtio console is an hvc other than hvc0 (Xen's own PV console); it works once init.kit has
# loaded virtio_mmio and the port is set up. There it says "VDMHVC READY", then runs each line it reads.
# A kernel without modules (the lab's domu-Image: every driver built in) gets an empty /etc/modules.
# Before init.kit, one line per virtio device on the console (hvc0), for dom0 to relay:
#   XENDOMU VIRTIO dev=virtioN id=<virtio id> driver=<name> access_platform=0|1 grant_dma=0|1 features=<bits>
# (access_platform: VIRTIO_F_ACCESS_PLATFORM negotiated; grant_dma: its device-tree node has
# `iommus` pointing at a `xen,grant-dma` node, libxl's grant_usage=1; features: the negotiated
# feature bits as sysfs prints them, bit 0 first).
# devtmpfs now (init.kit mounts it again, the same instance): ash opens /dev/null for a background job
mkdir -p /dev; mount -t devtmpfs dev /dev
# xenlab.bench=ROUNDS: benchmarks/xenlab_pv.py's disk rounds (domu-bench.sh) instead of the guest kit
mkdir -p /proc; mount -t proc proc /proc
case " $(cat /proc/cmdline) " in *" xenlab.bench="*) exec /bench.sh;; esac
[ -e /proc/modules ] || : >/etc/modules
mkdir -p /sys; mount -t sysfs sys /sys
for d in /sys/bus/virtio/devices/virtio*; do
  [ -e "$d/features" ] || continue
  ap=$(cut -c34 "$d/features")   # bit 33, first character = bit 0
  drv=$(basename "$(readlink "$d/driver")" 2>/dev/null)
  gd=0; [ -e "$d/../of_node/iommus" ] && grep -qs 'xen,grant-dma' /sys/firmware/devicetree/base/*/compatible && gd=1
  echo "XENDOMU VIRTIO dev=${d##*/} id=$(cat "$d/device") driver=${drv:-none} access_platform=${ap:-0} grant_dma=$gd features=$(cat "$d/features")" >/dev/console
done
umount /sys; umount /proc
(
  # hvc0..7 nodes exist from the start; the virtio console's is the one that opens, once the
  # driver has its port (multiport: after the control queue's CONSOLE_PORT)
  i=0; HVC=
  while [ -z "$HVC" ] && [ $i -lt 600 ]; do
    for h in 1 2 3 4 5 6 7; do
      ( exec 3<>/dev/hvc$h ) 2>/dev/null && { HVC=/dev/hvc$h; break; }
    done
    [ -n "$HVC" ] || sleep 0.2; i=$((i+1))
  done
  if [ -n "$HVC" ]; then
    # ONE open of the tty from "READY" on, by the shell that reads: hvc resets its termios and drops
    # its line discipline's input buffer when the last opener closes (TTY_DRIVER_RESET_TERMIOS), so
    # a line dom0 typed while an `echo READY >$HVC` held the tty was echoed there and then lost
    # with that echo's close; the same reset undid a `stty -F` run before. A read loop, not an
    # interactive sh: ash's line editing asks for the cursor position (ESC[6n) and eats input.
    exec setsid sh -c "exec <$HVC >$HVC 2>&1; stty -echo
      echo \"VDMHVC READY kernel=\$(uname -r) tty=$HVC\"
      while read -r cmd; do eval \"\$cmd\"; done"
  fi
) &
exec /init.kit
