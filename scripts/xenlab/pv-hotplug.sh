#!/bin/sh
# /lab/pv-hotplug in the Xen lab's dom0: the hotplug script of the domU's Xen PV devices (xl's
# `script=` in a disk or vif spec) for benchmarks/xenlab_pv.py. Xen's own /etc/xen/scripts/{block,
# vif-*} are bash; this dom0 has busybox only. libxl runs it with ACTION (add|remove|online|offline)
# as $1 and XENBUS_PATH (backend/vbd/D/N or backend/vif/D/N) in the environment.
#   vbd: physical-device = the block device's major:minor in hex, what xen-blkback waits for;
#   vif: the vif (vif<domid>.<devid>) up, addressed 10.0.3.2/24 (the domU: 10.0.3.15).
case $1 in add|online) ;; *) exit 0;; esac
case $XENBUS_PATH in
  backend/vbd/*)
    dev=$(xenstore-read "$XENBUS_PATH/params") || exit 1
    mm=$(cat "/sys/class/block/${dev##*/}/dev") || { echo "pv-hotplug: $dev is no block device" >&2; exit 1; }
    xenstore-write "$XENBUS_PATH/physical-device" "$(printf '%x:%x' "${mm%:*}" "${mm#*:}")" \
      "$XENBUS_PATH/physical-device-path" "$dev" || exit 1;;
  backend/vif/*)
    d=${XENBUS_PATH#backend/vif/}; vif=${vif:-vif${d%/*}.${d#*/}}
    ip link set "$vif" up && ip addr add 10.0.3.2/24 dev "$vif" || exit 1;;
  *) echo "pv-hotplug: unknown $XENBUS_PATH" >&2; exit 1;;
esac
xenstore-write "$XENBUS_PATH/hotplug-status" connected
echo "XENLAB PV-HOTPLUG $XENBUS_PATH ${dev:-$vif} connected" >/dev/console
