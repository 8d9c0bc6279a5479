#!/bin/sh
# /init of the vdm test guest (busybox-static; see README.md in this folder for the protocol).
# Kernel command line: console=ttyS0 panic=-1 quiet vdmtest=WL[,WL...] [vdmtest.KEY=VALUE ...]
# Every workload prints exactly one line:
#   VDMTEST RESULT <wl> ok|fail|skip key=value ... uptime_s=<guest uptime>
mount -t devtmpfs dev /dev 2>/dev/null; exec </dev/console >/dev/console 2>&1  # (moved here on a 9p root)
[ -e /proc/self ] || mount -t proc proc /proc; [ -e /sys/kernel ] || mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
ln -sf /proc/mounts /etc/mtab
up() { cut -d' ' -f1 /proc/uptime; }
now() { adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d.%06d\n", s, u}'; }
calc() { awk "BEGIN{d=$2; if (d <= 0) d=0.000001; printf \"%.1f\", ($1)/d}"; }
md5of() { md5sum "$@" | cut -c1-32; }
T_INIT=$(up)
# the kit's modules, then an author's (vdm_lab.GuestSpec: a second initramfs adds /etc/modules.extra)
for m in $(cat /etc/modules /etc/modules.extra 2>/dev/null); do
  [ -d /sys/module/$m ] && continue  # loaded before a switch to a 9p root (below)
  insmod /lib/modules/$m.ko || echo "VDMTEST WARN insmod $m failed"; done

# a root over 9p (vdm run --9p DIR,/dev/root adds root=/dev/root rootfstype=9p rootflags=... as
# kvmtool's sandbox does): mount it and switch_root to its init= (default /init, else /sbin/init);
# an /init there that is this script sees / is 9p and goes on to the workloads
R9=; R9_TAG=/dev/root; R9_FLAGS=trans=virtio,version=9p2000.L; R9_INIT=; R9_RO=
for w in $(cat /proc/cmdline); do case $w in
  rootfstype=9p) R9=1;; root=*) R9_TAG=${w#root=};; rootflags=*) R9_FLAGS=${w#rootflags=};;
  init=*) R9_INIT=${w#init=};; ro) R9_RO=,ro;; rw) R9_RO=;;
esac; done
if [ -n "$R9" ] && [ "$(awk '$2 == "/" {t = $3} END {print t}' /proc/mounts)" != 9p ]; then
  mkdir -p /newroot
  if mount -t 9p -o "$R9_FLAGS$R9_RO" "$R9_TAG" /newroot; then
    [ -n "$R9_INIT" ] || { R9_INIT=/init; [ -x /newroot/init ] || R9_INIT=/sbin/init; }
    umount /tmp; for d in dev proc sys; do mkdir -p /newroot/$d 2>/dev/null; mount --move /$d /newroot/$d; done
    echo "VDMTEST ROOT9P tag=$R9_TAG init=$R9_INIT"
    exec switch_root /newroot "$R9_INIT"
  fi
  echo "VDMTEST WARN 9p root $R9_TAG not mounted: staying in the initramfs"
fi
# a root on a virtio disk (root=/dev/vdX [rootfstype=ext4] [ro], as a distribution's initramfs does):
# wait for the device, mount it and switch_root to its init= as above; an /init there that is this
# script sees / is that device and goes on to the workloads
RD_FS=ext4; for w in $(cat /proc/cmdline); do case $w in rootfstype=*) RD_FS=${w#rootfstype=};; esac; done
case $R9_TAG in /dev/vd*) if [ -z "$R9" ] && [ "$(awk '$2 == "/" {d = $1} END {print d}' /proc/mounts)" != "$R9_TAG" ]; then
  i=0; while [ ! -b "$R9_TAG" ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done; mkdir -p /newroot
  if mount -t "$RD_FS" -o "rw$R9_RO" "$R9_TAG" /newroot; then
    [ -n "$R9_INIT" ] || { R9_INIT=/init; [ -x /newroot/init ] || R9_INIT=/sbin/init; }
    umount /tmp; for d in dev proc sys; do mkdir -p /newroot/$d 2>/dev/null; mount --move /$d /newroot/$d; done
    echo "VDMTEST ROOTDISK dev=$R9_TAG fs=$RD_FS init=$R9_INIT"
    exec switch_root /newroot "$R9_INIT"
  fi
  echo "VDMTEST WARN root $R9_TAG ($RD_FS) not mounted: staying in the initramfs"
fi;; esac

# parameters (vdmtest.KEY=VALUE); defaults here
WLS=none; P_mib=16; P_time=10; P_addr=10.0.2.15/24; P_ip=10.0.2.2; P_count=5; P_interval=0.2; P_timeout=10
P_exit=reboot; P_dev=/dev/vda; P_fsdev=; P_fsmib=8; P_fsfiles=64; P_peer=10.0.2.2:5555; P_tcp=recv
P_tcpmib=4; P_tcptimeout=60; P_rngbytes=4096; P_cpus=
P_9ptag=hostshare; P_9pmib=64; P_9pfiles=1000; P_9pro=; P_9psecret=
for w in $(cat /proc/cmdline); do case $w in
  vdmtest=*) WLS=${w#*=};;
  vdmtest.*=*) k=${w%%=*}; k=${k#vdmtest.}
    case $k in *[!a-z0-9_]*) echo "VDMTEST WARN bad key $k";; *) eval "P_$k=\${w#*=}";; esac;;
esac; done
[ -n "$P_fsdev" ] || P_fsdev=$P_dev
echo "VDMTEST INIT workloads=$WLS kernel=$(uname -r) init_uptime_s=$T_INIT modules_done_s=$(up)"

waitfor() { i=0; while [ ! -e "$1" ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done; [ -e "$1" ]; }
NET_UP=
netup() {  # eth0 with P_addr, once; fails if there is no eth0
  [ -n "$NET_UP" ] && return 0
  waitfor /sys/class/net/eth0 || return 1
  ip link set lo up; ip link set eth0 up; ip addr add "$P_addr" dev eth0 && NET_UP=1
}

wl_blk() {  # write P_mib MiB of random data at offset 0 of P_dev (O_DIRECT), read back, compare
  waitfor "$P_dev" || { result fail reason=no_dev dev="$P_dev"; return; }
  N=$P_mib; dd if=/dev/urandom of=/tmp/pat bs=1M count="$N" 2>/dev/null; S0=$(md5of /tmp/pat)
  t0=$(now); dd if=/tmp/pat of="$P_dev" bs=1M count="$N" oflag=direct conv=fsync 2>/dev/null; t1=$(now)
  dd if="$P_dev" of=/dev/null bs=1M count="$N" iflag=direct 2>/dev/null; t2=$(now)
  S1=$(dd if="$P_dev" bs=1M count="$N" iflag=direct 2>/dev/null | md5sum | cut -c1-32); rm -f /tmp/pat
  [ "$S0" = "$S1" ] && st=ok rb=match || st=fail rb=mismatch
  result $st dev="$P_dev" mib="$N" md5="$S0" readback=$rb \
    seq_write_MiBps="$(calc "$N" "$t1-$t0")" seq_read_MiBps="$(calc "$N" "$t2-$t1")"
}

wl_blkloop() {  # write+verify rounds of P_mib MiB on P_dev for P_time s (spans a live migration)
  waitfor "$P_dev" || { result fail reason=no_dev dev="$P_dev"; return; }
  echo "VDMTEST STARTED blkloop"
  end=$(( $(cut -d. -f1 /proc/uptime) + P_time )); n=0; bad=0; S0=
  while [ "$(cut -d. -f1 /proc/uptime)" -lt $end ] || [ $n = 0 ]; do
    dd if=/dev/urandom of=/tmp/pat bs=1M count="$P_mib" 2>/dev/null; S0=$(md5of /tmp/pat)
    dd if=/tmp/pat of="$P_dev" bs=1M count="$P_mib" oflag=direct conv=fsync 2>/dev/null || bad=$((bad+1))
    S1=$(dd if="$P_dev" bs=1M count="$P_mib" iflag=direct 2>/dev/null | md5sum | cut -c1-32)
    [ "$S0" = "$S1" ] || bad=$((bad+1))
    # buffered: the page cache is filled by the device alone (no CPU writes), then read again from
    # the cache a moment later -- a page the device wrote that a migration did not carry shows here
    echo 3 >/proc/sys/vm/drop_caches
    S2=$(dd if="$P_dev" bs=1M count="$P_mib" 2>/dev/null | md5sum | cut -c1-32); sleep 0.3
    S3=$(dd if="$P_dev" bs=1M count="$P_mib" 2>/dev/null | md5sum | cut -c1-32)
    [ "$S0" = "$S2" ] && [ "$S0" = "$S3" ] || bad=$((bad+1)); n=$((n+1))
  done
  rm -f /tmp/pat
  [ $bad = 0 ] && st=ok || st=fail
  result $st dev="$P_dev" mib="$P_mib" rounds=$n errors=$bad md5="$S0"
}

wl_fs() {  # mke2fs, copy P_fsmib MiB + P_fsfiles small files, umount, e2fsck, remount, verify
  D=$P_fsdev; waitfor "$D" || { result fail reason=no_dev dev="$D"; return; }
  mkdir -p /tmp/src /fs; rm -rf /tmp/src/*
  dd if=/dev/urandom of=/tmp/src/big bs=1M count="$P_fsmib" 2>/dev/null
  i=0; while [ $i -lt "$P_fsfiles" ]; do
    dd if=/dev/urandom of=/tmp/src/small$i bs=$((512 + i * 97)) count=1 2>/dev/null; i=$((i+1)); done
  (cd /tmp/src && md5sum * >/tmp/sums)
  mke2fs -F "$D" >/tmp/mkfs.log 2>&1 || { result fail reason=mke2fs dev="$D"; return; }
  mount -t ext2 "$D" /fs || { result fail reason=mount dev="$D"; return; }
  t0=$(now); mkdir /fs/d && cp /tmp/src/* /fs/d/ && sync; t1=$(now)
  umount /fs || { result fail reason=umount; return; }
  sync; echo 3 >/proc/sys/vm/drop_caches   # fsck and the remount must read the device, not the cache
  e2fsck -fn "$D" >/tmp/fsck.log 2>&1; fsck_rc=$?
  mount -t ext2 -o ro "$D" /fs || { result fail reason=remount fsck_rc=$fsck_rc; return; }
  (cd /fs/d && md5sum -c /tmp/sums >/tmp/verify.log 2>&1); v_rc=$?
  nf=$(ls /fs/d | wc -l); umount /fs
  [ $fsck_rc -eq 0 ] && [ $v_rc -eq 0 ] && st=ok || st=fail
  [ $fsck_rc -eq 0 ] || sed 's/^/VDMTEST FSCK /' /tmp/fsck.log
  [ $v_rc -eq 0 ] || grep -v ': OK$' /tmp/verify.log | sed 's/^/VDMTEST VERIFY /'
  result $st dev="$D" files="$nf" mib="$P_fsmib" fsck_rc=$fsck_rc verify_rc=$v_rc \
    copy_MiBps="$(calc "$P_fsmib" "$t1-$t0")"
}

wl_net() {  # configure eth0, ping P_ip
  netup || { result fail reason=no_eth0; return; }
  o=$(ping -c "$P_count" -i "$P_interval" -W 2 "$P_ip" 2>&1); rx=$(echo "$o" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
  rtt=$(echo "$o" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
  [ "${rx:-0}" -gt 0 ] && st=ok || st=fail
  result $st rx="${rx:-0}/$P_count" rtt_avg_ms="${rtt:-na}" target="$P_ip"
}

wl_nettcp() {  # TCP with busybox nc to P_peer (IP:PORT): recv a file, send P_tcpmib MiB, or both
  netup || { result fail reason=no_eth0; return; }
  ip=${P_peer%:*}; port=${P_peer##*:}; out=
  case $P_tcp in recv|both)
    t0=$(now); timeout "$P_tcptimeout" nc "$ip" "$port" </dev/null >/tmp/rx; rc=$?; t1=$(now)
    n=$(wc -c </tmp/rx); out="$out rx_rc=$rc rx_bytes=$n rx_md5=$(md5of /tmp/rx)"
    out="$out rx_MiBps=$(calc "$n/1048576" "$t1-$t0")"; rm -f /tmp/rx
    [ $rc -eq 0 ] && [ "$n" -gt 0 ] || st=fail;;
  esac
  case $P_tcp in send|both)
    [ "$P_tcp" = both ] && sleep 0.2
    dd if=/dev/urandom of=/tmp/tx bs=1M count="$P_tcpmib" 2>/dev/null; n=$(wc -c </tmp/tx)
    t0=$(now); timeout "$P_tcptimeout" nc "$ip" "$port" </tmp/tx >/dev/null; rc=$?; t1=$(now)
    out="$out tx_rc=$rc tx_bytes=$n tx_md5=$(md5of /tmp/tx) tx_MiBps=$(calc "$n/1048576" "$t1-$t0")"
    rm -f /tmp/tx; [ $rc -eq 0 ] || st=fail;;
  esac
  case $P_tcp in recv|send|both) ;; *) result fail reason=bad_tcp_mode tcp="$P_tcp"; return;; esac
  # shellcheck disable=SC2086
  result "${st:-ok}" peer="$P_peer" mode="$P_tcp"$out
}

wl_console() {  # the host side must echo the line back (or send back just the token)
  waitfor /dev/hvc0 || { result fail reason=no_hvc0; return; }
  exec 3<>/dev/hvc0; stty -F /dev/hvc0 raw -echo 2>/dev/null; tok=vdm$RANDOM$RANDOM; t0=$(now)
  echo "VDMTEST HVC-PING $tok" >&3; read -t "$P_timeout" line <&3; t1=$(now); exec 3<&-
  line=$(echo "$line" | tr -d '\r')
  case $line in *"$tok"*) result ok roundtrip_ms="$(calc "($t1-$t0)*1000" 1)";;
  *) result fail wrote=ok readback="$(echo "${line:-timeout}" | tr ' ' _)";; esac
}

wl_serial() {  # a token written straight to ttyS0: the host checks the log for it
  tok=vdm$RANDOM$RANDOM
  if echo "VDMTEST SERIAL-TOKEN $tok" >/dev/ttyS0; then result ok token=$tok; else result fail reason=write; fi
}

wl_rng() {  # P_rngbytes bytes from /dev/hwrng; fail if short or all equal
  waitfor /dev/hwrng || { result fail reason=no_hwrng; return; }
  cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
  t0=$(now); timeout "$P_timeout" head -c "$P_rngbytes" /dev/hwrng >/tmp/rng; t1=$(now)
  n=$(wc -c </tmp/rng); distinct=$(od -An -v -tu1 /tmp/rng | tr -s ' ' '\n' | grep . | sort -u | wc -l)
  [ "$n" -eq "$P_rngbytes" ] && [ "$distinct" -gt 1 ] && st=ok || st=fail
  result $st bytes="$n" distinct="$distinct" rng="${cur:-none}" md5="$(md5of /tmp/rng)" \
    KiBps="$(calc "$n/1024" "$t1-$t0")"; rm -f /tmp/rng
}

wl_smp() {  # online CPUs; with vdmtest.cpus=N, ok only if N are online
  n=$(nproc); online=$(cat /sys/devices/system/cpu/online)
  [ -z "$P_cpus" ] || [ "$P_cpus" = "$n" ] && st=ok || st=fail
  result $st cpus="$n" online="$online" expected="${P_cpus:-any}"
}

wl_blkrand() {  # fio 4k random read, qd32 (needs initrd-fio)
  command -v fio >/dev/null || { result skip reason=no_fio_use_initrd-fio; return; }
  waitfor "$P_dev" || { result fail reason=no_dev dev="$P_dev"; return; }
  o=$(fio --name=rr --filename="$P_dev" --rw=randread --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
      --time_based --runtime="$P_time" --minimal 2>&1 | tail -1)
  iops=$(echo "$o" | cut -d';' -f8)
  case $iops in ''|*[!0-9]*) result fail reason=fio out="$(echo "$o" | tr ' ' _)";;
  *) result ok randread_4k_qd32_iops="$iops" runtime_s="$P_time";; esac
}

wl_9p() {  # mount the 9p share P_9ptag (and P_9pro read-only); file work, a P_9pfiles-entry readdir, P_9pmib MiB
  # (never ": >file" where it may fail: a failed redirection on a special builtin ends the shell, here init)
  mkdir -p /9p; D=/9p/wl; F=; bad() { F="$F,$1"; }; step() { echo "VDMTEST STEP 9p $1 uptime_s=$(up)"; }
  step mount
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$P_9ptag" /9p || { result fail reason=mount; return; }
  step files; rm -rf $D; mkdir $D || { result fail reason=mkdir; return; }
  echo hello >$D/a && [ "$(cat $D/a)" = hello ] || bad create
  mv $D/a $D/b && [ ! -e $D/a ] && [ "$(cat $D/b)" = hello ] || bad rename
  ln $D/b $D/h && [ "$(stat -c %h $D/b)" = 2 ] && [ "$(cat $D/h)" = hello ] || bad link
  ln -s b $D/s && [ "$(readlink $D/s)" = b ] && [ "$(cat $D/s)" = hello ] || bad symlink
  chmod 640 $D/b && [ "$(stat -c %a $D/h)" = 640 ] || bad chmod
  truncate -s 2 $D/b && [ "$(cat $D/h)" = he ] || bad truncate
  dd if=/dev/zero of=$D/sync bs=4k count=4 conv=fsync 2>/dev/null && [ "$(stat -c %s $D/sync)" = 16384 ] || bad fsync
  step bigdir; mkdir $D/big; i=0; while [ $i -lt "$P_9pfiles" ]; do echo -n >$D/big/f$i; i=$((i+1)); done
  step readdir; n=$(ls $D/big | wc -l); [ "$n" = "$P_9pfiles" ] || bad "readdir_$n"
  step large; esc=blocked; [ "$(cat /9p/esc 2>/dev/null)" = "${P_9psecret:-x}" ] && esc=escaped && bad escape
  t0=$(now); dd if=/dev/urandom of=$D/large bs=1M count="$P_9pmib" conv=fsync 2>/dev/null; t1=$(now)
  step readback; echo 3 >/proc/sys/vm/drop_caches
  # 1 MiB reads (md5sum's own are 4 KiB: one 9p round trip each without a page cache)
  t2=$(now); W=$(dd if=$D/large bs=1M 2>/dev/null | md5sum | cut -c1-32); t3=$(now)
  H=$(dd if=/9p/hostbig bs=1M 2>/dev/null | md5sum | cut -c1-32); t4=$(now)
  step ro; RO=skip
  if [ -n "$P_9pro" ]; then mkdir -p /9pro
    if mount -t 9p -o trans=virtio,version=9p2000.L "$P_9pro" /9pro; then
      RO=refused; { touch /9pro/new || mkdir /9pro/d || rm /9pro/keep || chmod 777 /9pro/keep; } 2>/dev/null && RO=written
      [ "$(cat /9pro/keep)" = keep ] && [ ! -e /9pro/new ] || RO=written
      umount /9pro
    else RO=nomount; fi
    [ $RO = refused ] || bad "ro_$RO"
  fi
  umount /9p || bad umount
  [ -z "$F" ] && st=ok || st=fail
  result $st failed="${F#,}" large_md5="$W" hostbig_md5="$H" mib="$P_9pmib" escape=$esc ro=$RO \
    write_MiBps="$(calc "$P_9pmib" "$t1-$t0")" read_MiBps="$(calc "$P_9pmib" "$t3-$t2")" \
    hostbig_read_MiBps="$(calc "$P_9pmib" "$t4-$t3")"
}

for WL in $(echo "$WLS" | tr , ' '); do
  result() { st=$1; shift; echo "VDMTEST RESULT $WL $st $* uptime_s=$(up)"; }
  st=
  case $WL in
    boot|none) result ok;;
    shell) echo "VDMTEST shell: exit the shell to end the guest"; setsid cttyhack sh -l; result ok;;
    9p) wl_9p;;
    blk|blkloop|fs|net|nettcp|console|serial|rng|smp|blkrand) "wl_$WL";;
    *) if [ -f "/workloads/$WL" ]; then  # an author's workload (vdm_lab.GuestSpec): a subshell
         rm -f /tmp/.result; ( result() { touch /tmp/.result; echo "VDMTEST RESULT $WL $* uptime_s=$(up)"; }
           . "/workloads/$WL" ); rc=$?
         [ -e /tmp/.result ] || result fail reason=no_result rc=$rc
       else result fail reason=unknown_workload; fi;;
  esac
done
echo "VDMTEST DONE uptime_s=$(up)"
sync
case $P_exit in poweroff) poweroff -f;; none) exec sh;; *) reboot -f;; esac
