#!/bin/sh
# /bench.sh of the Xen lab's domU (run by domu-init.sh instead of the guest kit when the kernel
# command line has xenlab.bench=ROUNDS): the block half of benchmarks/xenlab_pv.py. The domU has
# two disks: /dev/vda, virtio-blk served by `vdm dm-only` in dom0, and /dev/xvda, Xen's PV block
# (xen-blkfront here, xen-blkback in dom0), each on a dom0 block device of its own (QEMU disks on
# the host's files). Each round measures both, in alternating order (vda first in odd rounds):
# sequential write and read (xenlab.benchmib MiB, 1 MiB O_DIRECT requests) and 4 KiB O_DIRECT
# requests one at a time (xenlab.benchops of them, consecutive offsets: busybox dd is what this
# domU has; no fio, so no random offsets nor queue depth). One line per device and round:
#   XENBENCH R=<round> dev=<vda|xvda> seqw_MiBps= seqr_MiBps= w4k_iops= r4k_iops=
# With xenlab.benchnet=MIB, then the same rounds over TCP (busybox nc to dom0's `peer.py serve`):
# the eth whose driver is virtio_net (vdm's tap, 10.0.2.2) and the other one, xen-netfront
# (netback's vif, 10.0.3.2); MIB MiB from dom0 (port 5601) and MIB MiB to dom0 (5602):
#   XENBENCH NET R=<round> dev=<vdm|pv> rx_MiBps= tx_MiBps= rx_bytes=
# then "VDMTEST DONE" (what dom0 waits for). Timestamps: /proc/uptime (10 ms).
mount -t proc proc /proc 2>/dev/null; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "XENBENCH WARN insmod $m failed"; done
ROUNDS=3; MIB=16; OPS=256; NET=0
for w in $(cat /proc/cmdline); do case $w in
  xenlab.bench=*) ROUNDS=${w#*=};; xenlab.benchmib=*) MIB=${w#*=};; xenlab.benchops=*) OPS=${w#*=};; xenlab.benchnet=*) NET=${w#*=};;
esac; done
up() { cut -d' ' -f1 /proc/uptime; }
rate() { awk "BEGIN{d=$2; if (d <= 0) d=0.01; printf \"%.3f\", ($1)/d}"; }
echo "XENBENCH INIT kernel=$(uname -r) rounds=$ROUNDS mib=$MIB ops=$OPS"
for d in vda xvda; do
  i=0; while [ ! -b /dev/$d ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  [ -b /dev/$d ] || { echo "XENBENCH FAIL no /dev/$d"; echo "VDMTEST DONE"; exec sleep 100000; }
  echo "XENBENCH DISK dev=$d driver=$(basename "$(readlink /sys/block/$d/device/driver)")" \
    "sectors=$(cat /sys/block/$d/size)"
done
# each device writes what it reads back first: 1 MiB of random bytes, O_DIRECT both ways
dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null; P=$(md5sum </tmp/pat | cut -c1-32)
for d in vda xvda; do
  dd if=/tmp/pat of=/dev/$d bs=64k count=16 oflag=direct conv=fsync 2>/dev/null
  R=$(dd if=/dev/$d bs=64k count=16 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
  [ "$R" = "$P" ] && rb=match || rb=mismatch
  echo "XENBENCH CHECK dev=$d readback=$rb"
done
one() {  # one DEV ROUND
  t0=$(up); dd if=/dev/zero of=/dev/$1 bs=1M count="$MIB" oflag=direct conv=fsync 2>/dev/null; t1=$(up)
  dd if=/dev/$1 of=/dev/null bs=1M count="$MIB" iflag=direct 2>/dev/null; t2=$(up)
  dd if=/dev/zero of=/dev/$1 bs=4k count="$OPS" oflag=direct 2>/dev/null; t3=$(up)
  dd if=/dev/$1 of=/dev/null bs=4k count="$OPS" iflag=direct 2>/dev/null; t4=$(up)
  echo "XENBENCH R=$2 dev=$1 seqw_MiBps=$(rate "$MIB" "$t1-$t0") seqr_MiBps=$(rate "$MIB" "$t2-$t1")" \
    "w4k_iops=$(rate "$OPS" "$t3-$t2") r4k_iops=$(rate "$OPS" "$t4-$t3") uptime_s=$t4"
}
r=1
while [ $r -le "$ROUNDS" ]; do
  if [ $((r % 2)) = 1 ]; then one vda $r; one xvda $r; else one xvda $r; one vda $r; fi
  r=$((r+1))
done
onenet() {  # onenet vdm|pv IP ROUND
  t0=$(up); n=$(timeout 600 nc "$2" 5601 </dev/null | wc -c); t1=$(up)
  dd if=/dev/zero bs=64k count=$((NET * 16)) 2>/dev/null | timeout 600 nc "$2" 5602 >/dev/null; t2=$(up)
  echo "XENBENCH NET R=$3 dev=$1 rx_MiBps=$(rate "$n/1048576" "$t1-$t0") tx_MiBps=$(rate "$NET" "$t2-$t1")" \
    "rx_bytes=$n uptime_s=$t2"
}
if [ "$NET" -gt 0 ]; then
  ip link set lo up; VE=; PE=
  i=0; while [ $i -lt 100 ] && { [ -z "$VE" ] || [ -z "$PE" ]; }; do
    for e in /sys/class/net/eth*; do
      [ -e "$e" ] || continue
      case $(basename "$(readlink "$e/device/driver")") in virtio_net) VE=${e##*/};; ?*) PE=${e##*/};; esac  # netfront: "vif"
    done; [ -n "$VE" ] && [ -n "$PE" ] || sleep 0.1; i=$((i+1))
  done
  echo "XENBENCH NETDEV vdm=${VE:-none} pv=${PE:-none}"
  if [ -n "$VE" ] && [ -n "$PE" ]; then
    ip link set "$VE" up; ip addr add 10.0.2.15/24 dev "$VE"; ip link set "$PE" up; ip addr add 10.0.3.15/24 dev "$PE"
    echo "XENBENCH PING vdm=$(ping -c 3 -W 5 10.0.2.2 | grep -c 'bytes from')/3 pv=$(ping -c 3 -W 5 10.0.3.2 | grep -c 'bytes from')/3"
    r=1
    while [ $r -le "$ROUNDS" ]; do
      if [ $((r % 2)) = 1 ]; then onenet vdm 10.0.2.2 $r; onenet pv 10.0.3.2 $r
      else onenet pv 10.0.3.2 $r; onenet vdm 10.0.2.2 $r; fi
      r=$((r+1))
    done
  fi
fi
echo "VDMTEST DONE uptime_s=$(up)"
exec sleep 100000
