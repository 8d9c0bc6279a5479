#!/bin/sh
# /init of the Xen lab's dom0 (busybox + Debian 13's arm64 xen-utils-4.20 + python3.13 + vdm).
# Starts xenstored and xenconsoled, then, per round: `xl create -p` of a domU with Xen 4.18+'s
# generic virtio devices (blk, net, console, rng: `virtio = [ "type=virtio,device<ID>, ..." ]`),
# `vdm dm-only --domid` serving them from xenstore (configs from --device: libxl carries none),
# `xl unpause` once every device is in InitWait, the dom0 peers (TCP server on vdm's tap, a client
# typing into vdm's virtio-console socket), the domU's VDMTEST lines relayed, `xl destroy`, vdm's
# exit status. Round 1 runs every workload with grant_usage=1 (the domU's virtio drivers put grant
# references in their descriptors: xen,grant-dma, VIRTIO_F_ACCESS_PLATFORM); round 2 (a second domU
# after the first is destroyed) boots, writes the disk and reads the rng through a new vdm with
# grant_usage=0 (foreign mappings). Both domUs run /lab/domu-Image (Debian's 6.12 built with
# CONFIG_XEN_VIRTIO, build.sh). Every line for the host starts "XENLAB ". Kernel command line:
# xenlab.disk=/dev/vda (the disk vdm serves: QEMU's, so the host can check it)
# xenlab.vdmtest=boot,blk,rng,net,nettcp xenlab.mib=4 xenlab.tcpmib=16 xenlab.timeout=400
# xenlab.rounds=2 xenlab.grants=1 (round 1's grant_usage) xenlab.shell=1 (debug: a shell at the end).
# xenlab.domuarg=ARG (repeatable): ARG appended to the domU kernel's command line.
# xenlab.mtu=9000 (none in xenlab.bench runs; empty: 1500): the MTU of round 1's net device (vdm's
# --device net,...,mtu=: VIRTIO_NET_F_MTU) and of its tap in dom0 (which refused 65535). Measured
# (scripts/xenlab/README.md): TCP between the domU and dom0 moved MTU-sized frames although TSO/GSO
# was negotiated both ways, and each frame's fixed cost in the emulated machine (vdm's ioreqs,
# interrupt and grant maps, the domU's and dom0's stacks) set the pace.
# xenlab.bench=ROUNDS [xenlab.benchmib=16 xenlab.benchops=256 xenlab.benchnet=MIB] (benchmarks/
# xenlab_pv.py): one domU instead, with vdm's virtio-blk on the QEMU disk with serial
# xenlab0 and Xen's PV block (xen-blkback, hotplug by /lab/pv-hotplug) on the one with serial
# xenlab1; with benchnet also vdm's virtio-net (tap 10.0.2.2/24) and a PV vif (xen-netback, vif
# 10.0.3.2/24) and `peer.py serve` on both; the domU runs domu-bench.sh. xenlab.benchblk=OPTS: vdm's
# disk options. The bench's domU runs Debian's own kernel (/lab/Image) with grant_usage=0, as measured.
mount -t devtmpfs dev /dev; exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
mkdir -p /var/run/xenstored /var/run/xen /var/log/xen/console /var/lib/xen /var/lib/xenstored /dev/shm
export PATH=/usr/lib/xen-4.20/bin:/usr/sbin:/usr/bin:/sbin:/bin LD_LIBRARY_PATH=/usr/lib/xen-4.20/lib
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "XENLAB $* uptime_s=$(up)"; }
DISK=/dev/vda; WL=boot,blk,rng,net,nettcp; MIB=4; TCPMIB=16; TIMEOUT=400; ROUNDS=2; SHELL_AT_END=
BENCH=; BENCHMIB=16; BENCHOPS=256; BENCHNET=0; BENCHBLK=; DOMU_EXTRA=; DOMU_ARGS=; CFG_EXTRA=; BLKOPTS=; GRANTS=1; MTU=9000
DOMU_KERNEL=/lab/domu-Image; [ -s $DOMU_KERNEL ] || DOMU_KERNEL=/lab/Image
for w in $(cat /proc/cmdline); do case $w in
  xenlab.disk=*) DISK=${w#*=};; xenlab.vdmtest=*) WL=${w#*=};; xenlab.mib=*) MIB=${w#*=};;
  xenlab.timeout=*) TIMEOUT=${w#*=};; xenlab.shell=*) SHELL_AT_END=1;;
  xenlab.tcpmib=*) TCPMIB=${w#*=};; xenlab.rounds=*) ROUNDS=${w#*=};; xenlab.grants=*) GRANTS=${w#*=};;
  xenlab.bench=*) BENCH=${w#*=};; xenlab.benchmib=*) BENCHMIB=${w#*=};; xenlab.benchops=*) BENCHOPS=${w#*=};;
  xenlab.benchnet=*) BENCHNET=${w#*=};; xenlab.benchblk=*) BENCHBLK=${w#*=};;
  xenlab.domuarg=*) DOMU_ARGS="$DOMU_ARGS ${w#*=}";; xenlab.mtu=*) MTU=${w#*=};;
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

ip link set lo up

VDMPY='import sys; from vdm.cli.main import main; sys.exit(main())'
# round N NAME WORKLOADS DEVICES GRANT_USAGE KERNEL: one domU served by one `vdm dm-only`; DEVICES
# are virtio ids; GRANT_USAGE 1: the domU's buffers are grants (its kernel needs CONFIG_XEN_VIRTIO)
round() {
  n=$1; name=$2; wl=$3; devs=$4; gu=$5; kernel=$6; P="XENLAB R$n"
  v=; for id in $devs; do v="$v${v:+, }\"type=virtio,device$id, transport=mmio, grant_usage=$gu\""; done
  log "R$n DOMU-CONFIG kernel=$kernel grant_usage=$gu devices=$(echo $devs | tr ' ' ,)"
  cat >/tmp/$name.cfg <<CFG
name = "$name"
kernel = "$kernel"
ramdisk = "/lab/domu.cpio.gz"
extra = "console=hvc0 panic=-1 quiet vdmtest=$wl vdmtest.mib=$MIB vdmtest.exit=none vdmtest.tcp=both vdmtest.tcpmib=$TCPMIB vdmtest.tcptimeout=$TIMEOUT vdmtest.timeout=30$DOMU_EXTRA$DOMU_ARGS"
memory = 192
vcpus = 1
virtio = [ $v ]
$CFG_EXTRA
CFG
  t0=$(up)
  # generic virtio devices: libxl does not wait for their backend, so the domain starts paused
  if ! xl -v create -p /tmp/$name.cfg >/tmp/xl-create-$n.log 2>&1; then
    grep -v 'domainbuilder: detail' /tmp/xl-create-$n.log | sed "s/^/$P XL /"; return 1
  fi
  domid=$(xl domid $name)
  log "R$n DOMU-CREATED-PAUSED name=$name domid=$domid create_s=$(awk "BEGIN{print $(up)-$t0}")"
  dev=; for id in $devs; do case $id in
    2) dev="$dev --device blk,path=$DISK$BLKOPTS";;
    1) dev="$dev --device net,tapif=vdmtap$n,host_ip=10.0.2.2/24${MTU:+,mtu=$MTU}";;
    3) dev="$dev --device console,backend=socket:/tmp/hvc$n.sock";;
  esac; done
  # shellcheck disable=SC2086
  VDM_PLUGIN_TIMEOUT=60 python3 -X faulthandler -c "$VDMPY" -v dm-only --domid "$domid" $dev --wait-timeout 60 >/tmp/vdm$n.log 2>&1 &
  VDM=$!
  log "R$n VDM-STARTED pid=$VDM devices=$(echo $dev | tr ' ' ,)"
  case " $devs " in *" 3 "*) python3 /lab/peer.py console /tmp/hvc$n.sock /tmp/hvc$n.log >/tmp/hvcpeer$n.log 2>&1 & HVCPEER=$!;; *) HVCPEER=;; esac
  # unpause once vdm has put every device in InitWait (it claimed the MMIO ranges before)
  i=0; while [ $i -lt 900 ] && kill -0 $VDM 2>/dev/null; do
    s=$(for d in $(xenstore-list /local/domain/0/backend/virtio/$domid 2>/dev/null); do
        xenstore-read /local/domain/0/backend/virtio/$domid/$d/state; done | sort -u | tr '\n' ' ')
    [ "$s" = "2 " ] && break; sleep 0.1; i=$((i+1)); done
  [ "$s" = "2 " ] || { sed "s/^/$P VDM /" /tmp/vdm$n.log; log "R$n VDM-NOT-READY states=$s"; xl destroy $name; return 1; }
  log "R$n DEVICES-INITWAIT ready_s=$(awk "BEGIN{print $(up)-$t0}")"
  case " $devs " in *" 1 "*)
    ip addr show dev vdmtap$n | sed -n "s/.*inet \([0-9.\/]*\).*/$P TAP vdmtap$n addr=\1/p"
    [ -n "$MTU" ] && { ip link set vdmtap$n mtu "$MTU" || log "R$n WARN tap mtu $MTU"; }
    ip link show dev vdmtap$n | sed -n "s/.* mtu \([0-9]*\).*/$P TAP vdmtap$n mtu=\1/p"
    if [ -n "$BENCH" ]; then python3 /lab/peer.py serve "$BENCHNET" >/tmp/peer$n.log 2>&1 & PEER=$!
    else python3 /lab/peer.py tcp 10.0.2.2 5555 "$TCPMIB" >/tmp/peer$n.log 2>&1 & PEER=$!; fi;; *) PEER=;; esac
  xl unpause $name
  log "R$n DOMU-UNPAUSED"
  CON=/var/log/xen/console/guest-$name.log
  t=0; vl=0; cl=0
  cpu() {  # CPU seconds so far: dom0 (user system idle) and each of vdm's threads, the peers
    c="$P CPU dom0=$(awk '/^cpu /{printf "%d/%d/%d", $2/100, $4/100, $5/100}' /proc/stat)"
    for p in $VDM $PEER $HVCPEER; do for s in /proc/$p/task/*/stat; do
      c="$c $(sed 's/.*) //' "$s" 2>/dev/null | awk -v t="${s%/stat}" '{n=split(t,a,"/"); printf "%s:%.1f", a[n], ($12+$13)/100}')"
    done; done; echo "$c uptime_s=$(up)"
  }
  relay() {  # new lines of the domU's console and of vdm's log
    c=$(tr -d '\r' <"$CON" 2>/dev/null | wc -l); [ "$c" -gt "$cl" ] && tr -d '\r' <"$CON" | sed -n "$((cl+1)),${c}p" | sed "s/^/$P DOMU /"; cl=$c
    c=$(wc -l </tmp/vdm$n.log); [ "$c" -gt "$vl" ] && sed -n "$((vl+1)),${c}p" /tmp/vdm$n.log | sed "s/^/$P VDM /"; vl=$c
  }
  while [ $t -lt "$TIMEOUT" ]; do
    grep -q 'VDMTEST DONE' "$CON" 2>/dev/null && break
    kill -0 $VDM 2>/dev/null || { log "R$n VDM-DIED-EARLY"; break; }
    [ $((t % 10)) = 9 ] && relay
    [ $((t % 60)) = 59 ] && { xl list 2>&1 | sed "s/^/$P XL-LIST /"; cpu; }
    sleep 1; t=$((t+1))
  done
  # the console peer: give its command a few seconds more if the workloads were quicker
  if [ -n "$HVCPEER" ]; then
    i=0; while ! grep -q 'cmd-ran' /tmp/hvcpeer$n.log && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
  fi
  relay; cpu
  grep -q 'VDMTEST DONE' "$CON" 2>/dev/null && log "R$n DOMU-DONE" || log "R$n DOMU-TIMEOUT"
  [ -n "$BENCH" ] && [ -n "$PEER" ] && kill $PEER 2>/dev/null  # serve runs until killed
  if [ -n "$PEER" ]; then  # it still drains and checksums what the domU sent last
    i=0; while kill -0 $PEER 2>/dev/null && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
    kill $PEER 2>/dev/null; sed "s/^XENLAB /$P /" /tmp/peer$n.log
  fi
  [ -n "$HVCPEER" ] && { kill $HVCPEER 2>/dev/null; sed "s/^XENLAB /$P /" /tmp/hvcpeer$n.log;
    tr -d '\r' </tmp/hvc$n.log | sed "s/^/$P HVCLOG /" | head -20; }
  xl destroy $name 2>&1 | sed "s/^/$P XL /"
  log "R$n DOMU-DESTROYED"
  i=0; while kill -0 $VDM 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
  if kill -0 $VDM 2>/dev/null; then log "R$n VDM-STILL-RUNNING (sending TERM)"; kill $VDM; sleep 2; fi
  wait $VDM; rc=$?
  sed -n "$((vl+1)),\$p" /tmp/vdm$n.log | sed "s/^/$P VDM /"
  log "R$n VDM-EXIT rc=$rc"
}

if [ -n "$BENCH" ]; then
  byserial() { for b in /sys/block/vd*; do [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${b##*/}"; done; }
  DISK=$(byserial xenlab0); PVDISK=$(byserial xenlab1)
  [ -b "$DISK" ] && [ -b "$PVDISK" ] || finish fail reason=bench_disks vdm=$DISK pv=$PVDISK
  log "BENCH vdm_disk=$DISK pv_disk=$PVDISK rounds=$BENCH mib=$BENCHMIB ops=$BENCHOPS net=$BENCHNET"
  MTU=; DOMU_EXTRA=" xenlab.bench=$BENCH xenlab.benchmib=$BENCHMIB xenlab.benchops=$BENCHOPS xenlab.benchnet=$BENCHNET"
  CFG_EXTRA="disk = [ 'format=raw, vdev=xvda, access=rw, backendtype=phy, script=/lab/pv-hotplug, target=$PVDISK' ]"
  devs=2
  [ "$BENCHNET" -gt 0 ] && { devs="2 1"; CFG_EXTRA="$CFG_EXTRA
vif = [ 'mac=00:16:3e:5e:00:02, script=/lab/pv-hotplug' ]"; }
  # vdm's disk options (xenlab.benchblk=cache=none,...); its default goes through dom0's page cache,
  # which xen-blkback bypasses. cache=none (O_DIRECT) fails every request on Xen: EFAULT, the kernel
  # cannot pin the privcmd-mapped guest pages for direct I/O (README)
  BLKOPTS=${BENCHBLK:+,$BENCHBLK}
  round 1 domu bench "$devs" 0 /lab/Image || finish fail reason=bench
  sync; finish done
fi
round 1 domu "$WL" "2 1 3 4" "$GRANTS" $DOMU_KERNEL || finish fail reason=round1
[ "$ROUNDS" -ge 2 ] && { round 2 domu2 boot,blk,rng "2 4" 0 $DOMU_KERNEL || finish fail reason=round2; }
sync
finish done
