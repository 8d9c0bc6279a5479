#!/bin/sh
# /init of the Xen lab's dom0 (busybox + Debian's arm64 xen-utils-4.17 + python3 + vdm).
# Starts xenstored, xenconsoled, `vdm dm-only` (xenstore mode: it waits for the guest's disk), then
# `xl create` of a domU whose virtio-mmio disk is served by vdm; relays the domU's console lines,
# then `xl destroy`, waits for vdm to exit and powers off. Every line for the host starts "XENLAB ".
# Kernel command line: xenlab.disk=/dev/vda (the disk vdm serves: QEMU's, so the host can check
# it) xenlab.vdmtest=boot,blk xenlab.mib=4 xenlab.timeout=240 xenlab.shell=1 (debug: a shell at the end).
mount -t devtmpfs dev /dev; exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
mkdir -p /var/run/xenstored /var/run/xen /var/log/xen/console /var/lib/xen /var/lib/xenstored /dev/shm
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin LD_LIBRARY_PATH=/usr/lib/xen-4.17/lib
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "XENLAB $* uptime_s=$(up)"; }
DISK=/dev/vda; WL=boot,blk; MIB=4; TIMEOUT=240; SHELL_AT_END=
for w in $(cat /proc/cmdline); do case $w in
  xenlab.disk=*) DISK=${w#*=};; xenlab.vdmtest=*) WL=${w#*=};; xenlab.mib=*) MIB=${w#*=};;
  xenlab.timeout=*) TIMEOUT=${w#*=};; xenlab.shell=*) SHELL_AT_END=1;;
esac; done
finish() {
  log "END $*"
  [ -n "$SHELL_AT_END" ] && setsid cttyhack sh -l
  sync; poweroff -f
}
log "DOM0-INIT kernel=$(uname -r) hypervisor=$(cat /sys/hypervisor/type 2>/dev/null)"
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko 2>/dev/null || echo "XENLAB WARN insmod $m failed"; done
mount -t xenfs xenfs /proc/xen 2>/dev/null
mkdir -p /dev/pts; mount -t devpts -o ptmxmode=666 devpts /dev/pts   # xenconsoled's ptys
i=0; while [ ! -e "$DISK" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -c /dev/xen/privcmd ] && [ -c /dev/xen/evtchn ] || finish fail reason=no_privcmd
[ -e "$DISK" ] || finish fail reason=no_disk disk=$DISK
log "DOM0-READY disk=$DISK"

xenstored --pid-file=/var/run/xenstored.pid >/tmp/xenstored.log 2>&1 || finish fail reason=xenstored
i=0; while [ ! -S /var/run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
xen-init-dom0 >/tmp/init-dom0.log 2>&1 || { cat /tmp/init-dom0.log; finish fail reason=xen-init-dom0; }
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/var/run/xenconsoled.pid \
  || finish fail reason=xenconsoled
log "XENSTORED-UP"

# vdm, from xenstore: it waits for the disk libxl announces and answers the InitWait handshake
python3 -X faulthandler -c 'import sys; from vdm.cli.main import main; sys.exit(main())' \
  -v dm-only --wait-timeout "$TIMEOUT" >/tmp/vdm.log 2>&1 &
VDM=$!
log "VDM-STARTED pid=$VDM"
# xl create only once vdm watches xenstore (libxl gives the backend 10 s to reach InitWait)
i=0; while ! grep -q "waiting for" /tmp/vdm.log && kill -0 $VDM 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
grep -q "waiting for" /tmp/vdm.log || { sed 's/^/XENLAB VDM /' /tmp/vdm.log; finish fail reason=vdm_not_waiting; }
log "VDM-WAITING"
cat >/tmp/domu.cfg <<CFG
name = "domu"
kernel = "/lab/Image"
ramdisk = "/lab/domu.cpio.gz"
extra = "console=hvc0 panic=-1 quiet vdmtest=$WL vdmtest.mib=$MIB vdmtest.exit=none"
memory = 192
vcpus = 1
disk = [ 'vdev=xvda, backendtype=standalone, specification=virtio, target=$DISK' ]
CFG
t0=$(up)
if ! xl -v create /tmp/domu.cfg >/tmp/xl-create.log 2>&1; then
  grep -v 'domainbuilder: detail' /tmp/xl-create.log | sed 's/^/XENLAB XL /'; sed 's/^/XENLAB VDM /' /tmp/vdm.log
  ps | sed 's/^/XENLAB PS /'; xenstore-ls -f /local/domain/0/backend | sed 's/^/XENLAB XS /'
  kill $VDM 2>/dev/null; finish fail reason=xl_create
fi
log "DOMU-CREATED create_s=$(awk "BEGIN{print $(up)-$t0}") domid=$(xl domid domu)"
xenstore-ls /local/domain/0/backend 2>/dev/null | sed 's/^/XENLAB XS /' | head -40

# relay the domU console until its init says DONE (or the time is up)
CON=/var/log/xen/console/guest-domu.log
t=0; vl=0
while [ $t -lt "$TIMEOUT" ]; do
  grep -q 'VDMTEST DONE' "$CON" 2>/dev/null && break
  kill -0 $VDM 2>/dev/null || { log "VDM-DIED-EARLY"; break; }
  if [ $((t % 15)) = 14 ]; then
    xl list 2>&1 | sed 's/^/XENLAB XL-LIST /'
    c=$(wc -l </tmp/vdm.log); [ "$c" -gt "$vl" ] && sed -n "$((vl+1)),${c}p" /tmp/vdm.log | sed 's/^/XENLAB VDM /'; vl=$c
  fi
  sleep 1; t=$((t+1))
done
tr -d '\r' <"$CON" 2>/dev/null | sed 's/^/XENLAB DOMU /'
grep -q 'VDMTEST DONE' "$CON" 2>/dev/null && log "DOMU-DONE" || log "DOMU-TIMEOUT"
xl destroy domu 2>&1 | sed 's/^/XENLAB XL /'
log "DOMU-DESTROYED"
i=0; while kill -0 $VDM 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
if kill -0 $VDM 2>/dev/null; then log "VDM-STILL-RUNNING (sending TERM)"; kill $VDM; sleep 2; fi
wait $VDM; rc=$?
sed -n "$((vl+1)),\$p" /tmp/vdm.log | sed 's/^/XENLAB VDM /'
log "VDM-EXIT rc=$rc"
sync
finish done
