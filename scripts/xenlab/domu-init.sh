#!/bin/sh
# /init of the Xen lab's domU: a shell on the virtio console for dom0 to type into, then the guest
# kit's init (/init.kit: modules, the vdmtest= workloads, VDMTEST lines on hvc0 = Xen's PV console).
# The virtio console is an hvc other than hvc0 (Xen's own PV console); it works once init.kit has
# loaded virtio_mmio and the port is set up. There it says "VDMHVC READY", then runs each line it reads.
# devtmpfs now (init.kit mounts it again, the same instance): ash opens /dev/null for a background job
mkdir -p /dev; mount -t devtmpfs dev /dev
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
    stty -F $HVC raw -echo 2>/dev/null
    echo "VDMHVC READY kernel=$(uname -r) tty=$HVC" >$HVC
    # a read loop, not an interactive sh: ash's line editing asks the terminal for the cursor
    # position (ESC[6n) and eats what was typed before it started
    exec setsid sh -c "exec <$HVC >$HVC 2>&1; while read -r cmd; do eval \"\$cmd\"; done"
  fi
) &
exec /init.kit
