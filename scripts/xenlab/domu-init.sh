#!/bin/sh
# /init of the Xen lab's domU: a shell on the virtio console for dom0 to type into, then the guest
# kit's init (/init.kit: modules, the vdmtest= workloads, VDMTEST lines on hvc0 = Xen's PV console).
# The virtio console is the domU's second hvc (hvc1: Xen's own PV console is hvc0); it appears once
# init.kit has loaded virtio_mmio. The shell there first says "VDMHVC READY".
# devtmpfs now (init.kit mounts it again, the same instance): ash opens /dev/null for a background job
mkdir -p /dev; mount -t devtmpfs dev /dev
(
  i=0; while [ ! -e /dev/hvc1 ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
  if [ -e /dev/hvc1 ]; then
    stty -F /dev/hvc1 raw -echo 2>/dev/null
    echo "VDMHVC READY kernel=$(uname -r)" >/dev/hvc1
    exec setsid sh -c 'exec sh -s </dev/hvc1 >/dev/hvc1 2>&1'
  fi
) &
exec /init.kit
