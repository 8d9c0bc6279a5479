#!/bin/sh
# /init of the KVM lab's L2 guest (QEMU TCG, -cpu max: AMD SVM; see README.md in this folder).
# Loads kvm_amd and 9p, enters the host's root (shared read-only over 9p) with chroot and runs the
# script named on the kernel command line: vdmlab.cmd=<host path of a shell script>.
# The script's stdout and stderr go to ttyS1 (the second -serial); this console (ttyS0) gets
#   VDMLAB INIT ...   VDMLAB START ...   VDMLAB HB ... (every 10 s)   VDMLAB RC=<exit code> ...
# A heartbeat (HB) line carries each CPU's /proc/stat total (user..guest_nice + idle, in ticks).
# Idle time is counted live, so the total of a healthy CPU always grows; a CPU whose total stops
# has stopped taking interrupts (see README.md, "When L2 itself gets stuck"). The
# harness ends such a run early instead of waiting for its timeout.
# Writable inside the chroot: /mnt (tmpfs, with /mnt/tmp as TMPDIR), /mnt/out when vdmlab.out=1
# (a read-write 9p share of a host folder, tag "labout").
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "VDMLAB WARN insmod $m failed"; done
ip link set lo up
mkdir -p /dev/pts /dev/shm; mount -t devpts -o ptmxmode=0666 devpts /dev/pts; mount -t tmpfs shm /dev/shm
svm=$(grep -c -w svm /proc/cpuinfo); npt=$(grep -c -w npt /proc/cpuinfo)
[ -d /sys/module/kvm_amd ] && kvm_amd=yes || kvm_amd=no
[ -c /dev/kvm ] && devkvm=yes || devkvm=no
echo "VDMLAB INIT kernel=$(uname -r) cpus=$(nproc) svm=$svm npt=$npt kvm_amd=$kvm_amd devkvm=$devkvm uptime_s=$(up)"

mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
  || { echo "VDMLAB FAIL reason=mount_9p"; echo "VDMLAB RC=255"; poweroff -f; }
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -o rbind /dev /host/dev
mount -t tmpfs -o mode=1777 scratch /host/mnt; mkdir -p /host/mnt/tmp; chmod 1777 /host/mnt/tmp
out=; cmd=; py=python3
for w in $(cat /proc/cmdline); do case $w in
  vdmlab.cmd=*) cmd=${w#*=};;
  vdmlab.py=*) py=${w#*=};;
  vdmlab.out=1) out=1;;
esac; done
if [ -n "$out" ]; then
  mkdir -p /host/mnt/out
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 labout /host/mnt/out || echo "VDMLAB WARN out share"
fi
stty -F /dev/ttyS1 raw -echo 2>/dev/null
# Hold KVM's static keys on (see kvmhold.py): scripts that create and destroy VMs would otherwise
# patch __schedule each time, which QEMU's multi-threaded TCG sometimes turns into a livelock.
chroot /host "$py" -I -S - </kvmhold.py >/dev/console 2>&1 &
i=0; while [ ! -e /dev/shm/vdmlab-kvmhold ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
[ -e /dev/shm/vdmlab-kvmhold ] || echo "VDMLAB WARN kvmhold is not running"
echo "VDMLAB START uptime_s=$(up)"
cputicks() { awk '/^cpu[0-9]/ { s = 0; for (i = 2; i <= NF; i++) s += $i; printf "%s%d", (n++ ? "," : ""), s }' /proc/stat; }
( while sleep 10; do echo "VDMLAB HB uptime_s=$(up) cpu=$(cputicks)"; done ) &
hb=$!
if [ -n "$cmd" ]; then
  chroot /host /bin/sh "$cmd" </dev/null >/dev/ttyS1 2>&1; rc=$?
else
  echo "VDMLAB no vdmlab.cmd= given"; rc=254
fi
kill $hb 2>/dev/null
echo "VDMLAB RC=$rc uptime_s=$(up)"
sync
poweroff -f
