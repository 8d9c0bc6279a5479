#!/bin/bash
# build.sh OUTDIR — the Xen lab (arm64 Xen 4.17 under QEMU TCG), from Debian packages only.
# Writes to OUTDIR (default ~/.cache/vdm/xenlab):
#   xen             Debian's xen 4.17 source package, hypervisor only, rebuilt for arm64 with
#                   CONFIG_EXPERT=y CONFIG_IOREQ_SERVER=y (cross gcc-aarch64-linux-gnu)
#   Image           Debian's linux-image-arm64 (6.1), uncompressed: dom0 and domU kernel
#   domu.cpio.gz    the domU initramfs: busybox + virtio_mmio/virtio_blk + ../guestkit/init.sh as /init
#   dom0.cpio.gz    the dom0 initramfs: arm64 libc, busybox, xen-utils-4.17 (xl, xenstored,
#                   xenconsoled) and libraries, python3.11 + cffi + pluggy, this checkout's vdm
#                   (pure Python, pip --target), dom0-init.sh as /init, domu.cpio.gz + Image in /lab
#   lab.txt         package versions
# Each stage is cached (stamp files in OUTDIR); the vdm layer is rebuilt whenever the checkout
# changes (cheap; XENLAB_STAGE=vdm runs only that step, XENLAB_STAGE=xen only the hypervisor). Needs root for the first build (dpkg --add-architecture arm64, deb-src, apt-get
# install gcc-aarch64-linux-gnu qemu-system-arm bison flex dpkg-dev python3-pip).
set -euo pipefail
OUT=$(realpath -m "${1:-$HOME/.cache/vdm/xenlab}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
mkdir -p "$OUT"; exec 9>"$OUT/.lock"; flock 9
W=$OUT/.work; mkdir -p "$W/deb" "$W/x"
say() { echo "xenlab: $*" >&2; }
t_start=$(date +%s)

# ---- vdm itself: pure Python, installed with --target from a Python that can build offline ------
# A fresh virtual environment has pip and (up to 3.11) setuptools but no `wheel`: with
# --no-build-isolation its setuptools (< 70.1) cannot build a wheel ("invalid command 'bdist_wheel'"),
# and with isolation pip would need the network. vdm is pure Python, so any Python builds the same
# files: use the first of $XENLAB_PYTHON, python3, /usr/bin/python3 (Debian's python3-pip brings
# setuptools and wheel) that has pip and can build a wheel offline.
can_build() {
  "$1" -m pip --version >/dev/null 2>&1 && "$1" - <<'PY' >/dev/null 2>&1
import importlib.util, sys
import setuptools
version = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
sys.exit(0 if version >= (70, 1) or importlib.util.find_spec("wheel") else 1)
PY
}
build_python() {
  local py
  for py in ${XENLAB_PYTHON:-} python3 /usr/bin/python3; do
    command -v "$py" >/dev/null 2>&1 && can_build "$py" && { command -v "$py"; return 0; }
  done
  return 1
}
build_vdm_pkgs() {  # build_vdm_pkgs DIR: this checkout's vdm-core, vdm-xen, vdm-blk into DIR
  local py
  py=$(build_python) || { say "no Python here can build a wheel offline: install python3-pip (Debian: brings setuptools and wheel) or 'pip install wheel', or set XENLAB_PYTHON"; exit 1; }
  rm -rf "$1"; mkdir -p "$1"
  "$py" -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check \
    --target "$1" "$REPO/core" "$REPO/plugins/xen" "$REPO/plugins/blk" >"$W/pip.log" 2>&1 \
    || { cat "$W/pip.log" >&2; say "pip install (with $py) failed"; exit 1; }
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$1/bin"
}
# XENLAB_STAGE=vdm: only that step (no root, no downloads), into OUTDIR/.work/vdm-pkgs
if [ "${XENLAB_STAGE:-all}" = vdm ]; then build_vdm_pkgs "$W/vdm-pkgs"; say "vdm packages in $W/vdm-pkgs"; exit 0; fi

# ---- host setup (root, once) -------------------------------------------------------------------
setup_host() {
  local need=()
  dpkg --print-foreign-architectures | grep -qx arm64 || need+=(arch)
  ls /etc/apt/sources.list.d/vdm-xenlab-src.sources >/dev/null 2>&1 || grep -rqs '^\(deb-src\|Types: deb-src\)' /etc/apt/sources.list /etc/apt/sources.list.d/ || need+=(src)
  for t in aarch64-linux-gnu-gcc qemu-system-aarch64 bison flex dpkg-source; do
    command -v $t >/dev/null || need+=(pkgs)
  done
  build_python >/dev/null || need+=(pkgs)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || { say "needs root once for: ${need[*]} (arm64 arch, deb-src, cross gcc, qemu)"; exit 1; }
  dpkg --add-architecture arm64
  if [[ " ${need[*]} " == *" src "* ]]; then
    cat >/etc/apt/sources.list.d/vdm-xenlab-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu qemu-system-arm bison flex \
    dpkg-dev python3-pip python3-setuptools python3-wheel cpio >/dev/null
}
setup_host

dl() {  # dl PKG[:arm64]... -> .debs in $W/deb (cached)
  local p f
  for p in "$@"; do
    f=${p%%:*}
    ls "$W/deb/${f}_"*.deb >/dev/null 2>&1 && continue
    (cd "$W/deb" && apt-get download -q "$p" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' -e '^Get:' -e '^Fetched' || true)
    ls "$W/deb/${f}_"*.deb >/dev/null 2>&1 || { say "cannot download $p"; exit 1; }
  done
}
debfile() { ls "$W/deb/${1}_"*.deb | head -1; }

# ---- 1. the IOREQ-enabled hypervisor -----------------------------------------------------------
XEN_STAMP="xen-4.17 EXPERT IOREQ_SERVER v1"  # bump to force a rebuild
build_xen() {
  [ -s "$OUT/xen" ] && [ "$(cat "$OUT/xen.stamp" 2>/dev/null)" = "$XEN_STAMP" ] && return 0
  local t0; t0=$(date +%s)
  dl xen-hypervisor-4.17-arm64:arm64
  mkdir -p "$W/src"
  if ! ls -d "$W/src"/xen-*/xen >/dev/null 2>&1; then
    # newest first; a version the mirror lacks (the security pool's sources can be missing) is skipped
    local v ok=
    for v in $(apt-cache showsrc xen | awk '/^Version: 4\.17/{print $2}' | sort -rV | uniq); do
      (cd "$W/src" && apt-get source -q "xen=$v" >>"$W/xen-source.log" 2>&1) && { ok=$v; break; }
      rm -rf "$W/src"/xen-*/
    done
    [ -n "$ok" ] || { say "apt-get source xen failed (deb-src?): $W/xen-source.log"; exit 1; }
  fi
  local S; S=$(ls -d "$W/src"/xen-*/ | head -1)
  rm -rf "$W/xhv"; dpkg-deb -x "$(debfile xen-hypervisor-4.17-arm64)" "$W/xhv"
  local cfg; cfg=$(ls "$W/xhv"/boot/xen-*.config | head -1)
  { grep -v -e 'CONFIG_EXPERT' -e 'CONFIG_IOREQ_SERVER' "$cfg"; echo CONFIG_EXPERT=y; echo CONFIG_IOREQ_SERVER=y; } \
    >"$S/xen/.config"
  local mk=(make -C "$S/xen" XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- -j"$(nproc)")
  "${mk[@]}" olddefconfig >"$W/xen-build.log" 2>&1
  grep -qx CONFIG_IOREQ_SERVER=y "$S/xen/.config" || { say "olddefconfig dropped CONFIG_IOREQ_SERVER"; exit 1; }
  "${mk[@]}" >>"$W/xen-build.log" 2>&1 || { tail -30 "$W/xen-build.log" >&2; say "xen build failed"; exit 1; }
  cp "$S/xen/xen" "$OUT/xen.new" && mv "$OUT/xen.new" "$OUT/xen"
  cp "$S/xen/.config" "$OUT/xen.config"
  echo "$XEN_STAMP" >"$OUT/xen.stamp"
  echo "xen_build_s=$(( $(date +%s) - t0 ))" >"$OUT/xen-build-time.txt"
  say "hypervisor built in $(( $(date +%s) - t0 )) s"
}
[ "${XENLAB_STAGE:-all}" = xen ] || [ "${XENLAB_STAGE:-all}" = all ] && build_xen
[ "${XENLAB_STAGE:-all}" = xen ] && exit 0

# ---- 2. packages: the arm64 kernel, busybox, Xen's tools, python3 + cffi --------------------------
KPKG=$(apt-cache depends linux-image-arm64:arm64 | awk '/Depends: linux-image-/{sub(/:arm64/, "", $2); print $2; exit}')
[ -n "$KPKG" ] || { say "no linux-image-arm64 in apt's lists"; exit 1; }
KVER=${KPKG#linux-image-}
# runtime closure, checked below against every ELF's NEEDED list
DOM0_PKGS="libc6 libgcc-s1 busybox-static xen-utils-4.17 xenstore-utils libxencall1 libxendevicemodel1
 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenhypfs1 libxenmisc4.17 libxenstore4
 libxentoolcore1 libxentoollog1 libyajl2 libncurses6 libncursesw6 libtinfo6 zlib1g liblzma5 libzstd1
 libbz2-1.0 liblzo2-2 libuuid1 libfdt1 libgnutls30 libnl-3-200 libnl-route-3-200 libaio1
 libglib2.0-0 libpcre2-8-0 libffi8 libexpat1 libcrypt1 libsqlite3-0 libreadline8
 libtirpc3 libnsl2 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0
 libkeyutils1 libssl3 libdb5.3 libidn2-0 libunistring2 libtasn1-6 libnettle8 libhogweed6 libgmp10
 libp11-kit0 libselinux1 libblkid1 libmount1 libext2fs2 libpixman-1-0
 xen-utils-common python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-cffi-backend python3-cffi
 python3-pycparser python3-ply python3-pluggy media-types"
arm() { local p o=(); for p in "$@"; do case $p in python3-cffi|python3-pycparser|python3-ply|python3-pluggy|media-types) o+=("$p");; *) o+=("$p:arm64");; esac; done; echo "${o[@]}"; }
PK_STAMP=$(echo "$KPKG $DOM0_PKGS" | sha256sum | cut -c1-16)
unpack_all() {
  [ "$(cat "$W/x/.stamp" 2>/dev/null)" = "$PK_STAMP" ] && return 0
  local p
  # shellcheck disable=SC2046
  dl $(arm "$KPKG" $DOM0_PKGS)
  rm -rf "$W/x"; mkdir -p "$W/x"
  for p in "$KPKG" $DOM0_PKGS; do dpkg-deb -x "$(debfile "$p")" "$W/x"; done
  echo "$PK_STAMP" >"$W/x/.stamp"
}
unpack_all
X=$W/x; KDIR=$X/lib/modules/$KVER
if [ ! -s "$OUT/Image" ] || [ "$OUT/Image" -ot "$X/.stamp" ]; then
  gzip -dc "$X/boot/vmlinuz-$KVER" >"$OUT/Image.new" 2>/dev/null || cp "$X/boot/vmlinuz-$KVER" "$OUT/Image.new"
  mv "$OUT/Image.new" "$OUT/Image"
fi

find "$KDIR/kernel" -name '*.ko*' | awk -F/ '{n=$NF; sub(/\.ko.*/, "", n); gsub(/-/, "_", n); print n, $0}' >"$W/modindex"
sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$KDIR/modules.builtin" >"$W/builtin"
WHO=xenlab; . "$REPO/scripts/guestkit/modules.sh"   # addmods DIR MOD..., pack DIR (shared with guestkit/build.sh)
BB_APPLETS="sh ash mount umount insmod mkdir cat echo sleep grep sed awk cut tr ls ln rm cp mv ps kill
 dd md5sum sync poweroff reboot halt setsid cttyhack ip date uname head tail wc sort uniq od stty
 timeout adjtimex printf test [ [[ env true false find chmod mknod seq tee expr hexdump dmesg nproc
 basename dirname readlink free df du xargs which pidof usleep uptime"
applets() { local a; for a in $BB_APPLETS; do ln -sf busybox "$1/bin/$a"; done; }

# ---- 3. the domU initramfs: the guest kit's init ------------------------------------------------
DU=$W/domu; rm -rf "$DU"; mkdir -p "$DU"/{bin,sbin,dev,proc,sys,tmp,etc,mnt,lib/modules}
cp "$X/bin/busybox" "$DU/bin/busybox"; applets "$DU"
addmods "$DU" virtio_mmio virtio_blk
install -m 755 "$REPO/scripts/guestkit/init.sh" "$DU/init"
pack "$DU" | gzip -6n >"$OUT/domu.cpio.gz"

# ---- 4. the dom0 initramfs -----------------------------------------------------------------------
D=$W/dom0; rm -rf "$D"; mkdir -p "$D"
( cd "$X" && tar cf - --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/locale \
    --exclude=./usr/share/info --exclude=./usr/share/lintian --exclude=./boot --exclude=./lib/modules \
    --exclude=./usr/lib/python3.11/ensurepip --exclude=./usr/lib/python3.11/idlelib \
    --exclude=./usr/lib/python3.11/tkinter --exclude=./usr/lib/python3.11/lib2to3 \
    --exclude='./usr/lib/python3.11/pydoc_data' --exclude=./usr/lib/xen-4.17/boot . ) | (cd "$D" && tar xf -)
mkdir -p "$D"/{dev,proc,sys,tmp,run,mnt,lib/modules,var/run,var/log/xen,var/lib/xen,var/lib/xenstored,lab,etc}
rm -f "$D/bin/sh"; applets "$D"
ln -sf python3.11 "$D/usr/bin/python3"
addmods "$D" xen_evtchn xen_privcmd xen_gntdev xen_gntalloc xenfs virtio_mmio virtio_blk
# this checkout's vdm, pure Python, into the dom0 python's dist-packages (no deps: Debian's above)
VP=$W/vdm-pkgs; build_vdm_pkgs "$VP"
cp -a "$VP"/. "$D/usr/lib/python3/dist-packages/"
install -m 755 "$HERE/dom0-init.sh" "$D/init"
# byte-compile (the .debs ship no .pyc; compiling at import costs seconds per module under TCG).
# The host's python must be the same 3.11 (.pyc files are arch-independent).
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  python3 -m compileall -q -j "$(nproc)" -s "$D" -p / "$D/usr/lib/python3.11" "$D/usr/lib/python3/dist-packages" \
    >/dev/null 2>&1 || say "warning: compileall reported errors (some modules are compiled at import)"
else
  say "warning: host python is not 3.11: dom0 compiles its modules at import (slower start)"
fi
cp "$OUT/Image" "$OUT/domu.cpio.gz" "$D/lab/"
# every ELF's NEEDED must resolve inside the tree
missing=$( find "$D" -type f \( -name '*.so*' -o -perm -u+x \) | while read -r f; do
      [ "$(head -c 4 "$f")" = $'\x7fELF' ] || continue
      aarch64-linux-gnu-readelf -d "$f" 2>/dev/null | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'
    done | sort -u | while read -r so; do
      [ -e "$D/lib/aarch64-linux-gnu/$so" ] || [ -e "$D/usr/lib/aarch64-linux-gnu/$so" ] || [ -e "$D/lib/$so" ] || echo "$so"
    done ) || true
[ -z "$missing" ] || say "warning: unresolved libraries in dom0 (ok if unused): $(echo $missing)"
pack "$D" >"$OUT/dom0.cpio"

{ echo "kernel_package=$KPKG $(dpkg-deb -f "$(debfile "$KPKG")" Version)"
  echo "xen_source=$(ls -d "$W/src"/xen-*/ | xargs -n1 basename)"
  for p in xen-utils-4.17 python3.11-minimal python3-cffi-backend busybox-static; do
    echo "$p=$(dpkg-deb -f "$(debfile "$p")" Version)"; done
  echo "dom0_modules=$(tr '\n' ' ' <"$D/etc/modules")"
  echo "domu_modules=$(tr '\n' ' ' <"$DU/etc/modules")"; } >"$OUT/lab.txt"
say "built in $OUT ($(( $(date +%s) - t_start )) s): $(du -sh "$OUT/dom0.cpio" | cut -f1) dom0 initramfs"
