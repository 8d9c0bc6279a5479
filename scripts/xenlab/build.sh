#!/bin/bash
# build.sh OUTDIR — the Xen lab (arm64 Xen 4.20 under QEMU TCG), from Debian 13 (trixie) packages.
# Writes to OUTDIR (default ~/.cache/vdm/xenlab):
#   xen             Xen 4.20, hypervisor only, rebuilt for arm64 with CONFIG_EXPERT=y
#                   CONFIG_IOREQ_SERVER=y (cross gcc-aarch64-linux-gnu) from Debian's `xen` source
#                   package (trixie) and Debian's own xen-4.20-arm64.config; where the mirror lacks
#                   those sources (here: the .dsc and tarballs 404), from xen.git at the release tag
#                   Debian's version names (XENLAB_XEN_GIT=/path/to/xen.git, else a shallow clone)
#   Image           Debian 13's linux-image-arm64 (6.12), uncompressed: dom0 kernel (and the
#                   domU's in benchmarks/xenlab_pv.py's runs)
#   domu-Image      the domU kernel of the lab's rounds: Debian's own linux source (the
#                   linux-source-6.12 deb: Debian 13's 6.12 with Debian's patches) cross-built from
#                   tinyconfig + domu-kernel.config (CONFIG_XEN_VIRTIO for grant_usage=1, which
#                   Debian's arm64 kernel lacks; every driver built in); cached by domu-Image.stamp
#                   (source version + that file's hash), build time in domu-kernel-build-time.txt
#   domu.cpio.gz    the domU initramfs: busybox + virtio_mmio/blk/net/rng + ../guestkit/init.sh
#                   (as /init.kit) behind domu-init.sh (a shell on the virtio console)
#   dom0.cpio       the dom0 initramfs: arm64 libc, busybox, xen-utils-4.20 (xl, xenstored,
#                   xenconsoled) and libraries, python3.13 + cffi + pluggy, this checkout's vdm
#                   (core, xen, blk, net, console, examples/rng; pure Python, pip --target), byte-
#                   compiled by Debian 13's amd64 python3.13 (same version: the .pyc are the same),
#                   dom0-init.sh as /init, domu.cpio.gz + Image in /lab
#   lab.txt         package versions
# apt runs with a configuration of its own (OUTDIR/.work/apt: trixie, arm64 + amd64, deb-src), never
# the machine's sources. Each stage is cached (stamp files in OUTDIR); the vdm layer is rebuilt
# whenever build.sh runs (cheap; XENLAB_STAGE=vdm runs only that step, XENLAB_STAGE=xen only the
# hypervisor, XENLAB_STAGE=domu-kernel only the domU kernel). Needs root for the first build (apt-get
# install gcc-aarch64-linux-gnu qemu-system-arm bison flex dpkg-dev python3-pip cpio bc make gcc).
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
build_vdm_pkgs() {  # build_vdm_pkgs DIR: this checkout's vdm-core, -xen, -blk, -net, -console, rng into DIR
  local py
  py=$(build_python) || { say "no Python here can build a wheel offline: install python3-pip (Debian: brings setuptools and wheel) or 'pip install wheel', or set XENLAB_PYTHON"; exit 1; }
  rm -rf "$1"; mkdir -p "$1"
  "$py" -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check \
    --target "$1" "$REPO/core" "$REPO/plugins/xen" "$REPO/plugins/blk" "$REPO/plugins/net" \
    "$REPO/plugins/console" "$REPO/examples/rng" >"$W/pip.log" 2>&1 \
    || { cat "$W/pip.log" >&2; say "pip install (with $py) failed"; exit 1; }
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$1/bin"
}
# XENLAB_STAGE=vdm: only that step (no root, no downloads), into OUTDIR/.work/vdm-pkgs
if [ "${XENLAB_STAGE:-all}" = vdm ]; then build_vdm_pkgs "$W/vdm-pkgs"; say "vdm packages in $W/vdm-pkgs"; exit 0; fi

# ---- host setup (root, once) -------------------------------------------------------------------
setup_host() {
  local need=() t
  for t in aarch64-linux-gnu-gcc qemu-system-aarch64 bison flex dpkg-source cpio xz bc make gcc perl; do
    command -v $t >/dev/null || need+=(pkgs)
  done
  build_python >/dev/null || need+=(pkgs)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || { say "needs root once to install: cross gcc, qemu-system-arm, bison, flex, dpkg-dev, python3-pip, cpio, bc, make, gcc, perl"; exit 1; }
  apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu qemu-system-arm bison flex \
    dpkg-dev python3-pip python3-setuptools python3-wheel cpio xz-utils bc make gcc libc6-dev perl >/dev/null
}
setup_host

# apt with a configuration of its own: Debian 13 (trixie) for arm64 (the lab) and amd64 (the
# host-side python3.13 that byte-compiles dom0's modules), binaries and sources
SUITE=${XENLAB_SUITE:-trixie}
setup_apt() {
  local A=$W/apt
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/none"
  : >"$A/status"
  cat >"$A/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security $SUITE-security main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security $SUITE-security main
SRC
  cat >"$A/apt.conf" <<CONF
Dir::Etc::SourceList "$A/sources.list";
Dir::Etc::SourceParts "$A/none";
Dir::Etc::Preferences "$A/none/preferences";
Dir::Etc::PreferencesParts "$A/none";
Dir::State::Lists "$A/lists";
Dir::State::status "$A/status";
Dir::Cache "$A/cache";
APT::Architecture "arm64";
APT::Architectures { "arm64"; "amd64"; };
Acquire::Languages "none";
CONF
  export APT_CONFIG=$A/apt.conf
  # the lists are refreshed once a day at most (a cached lab builds offline)
  if [ -z "$(find "$A/lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    apt-get update -qq >"$W/apt-update.log" 2>&1 || { ls "$A/lists"/*Packages* >/dev/null 2>&1 \
      && say "apt-get update failed: using the lists from before" \
      || { cat "$W/apt-update.log" >&2; say "apt-get update ($SUITE) failed"; exit 1; }; }
  fi
}
setup_apt

debdir() { case $1 in *:amd64) echo "$W/deb-amd64";; *) echo "$W/deb";; esac; }
dl() {  # dl PKG[:amd64]... -> .debs in $W/deb (arm64) or $W/deb-amd64 (cached; one apt-get for all)
  local p want=()
  for p in "$@"; do ls "$(debdir "$p")/${p%%:*}_"*.deb >/dev/null 2>&1 || want+=("$p"); done
  [ ${#want[@]} -eq 0 ] && return 0
  mkdir -p "$W/deb" "$W/deb-amd64"
  local d batch
  for d in "$W/deb" "$W/deb-amd64"; do
    batch=(); for p in "${want[@]}"; do [ "$(debdir "$p")" = "$d" ] && batch+=("$p"); done
    [ ${#batch[@]} -eq 0 ] && continue
    (cd "$d" && apt-get download -q "${batch[@]}" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' -e '^Get:' -e '^Fetched' || true)
  done
  for p in "${want[@]}"; do
    ls "$(debdir "$p")/${p%%:*}_"*.deb >/dev/null 2>&1 || { say "cannot download $p ($SUITE)"; exit 1; }
  done
}
debfile() { ls "$(debdir "${2:-}")/${1}_"*.deb | head -1; }

# ---- 1. the IOREQ-enabled hypervisor -----------------------------------------------------------
XEN_STAMP="xen-4.20 EXPERT IOREQ_SERVER v1"  # bump to force a rebuild
xen_source() {  # unpack Xen 4.20's source into $W/src/xen-*/; echo what it came from
  local v
  mkdir -p "$W/src"
  ls -d "$W/src"/xen-*/xen >/dev/null 2>&1 && { cat "$W/src/origin"; return 0; }
  v=$(apt-cache showsrc xen | awk '/^Version: 4\.20/{print $2}' | sort -rV | head -1)
  [ -n "$v" ] || { say "no xen 4.20 source package in $SUITE's lists"; exit 1; }
  if (cd "$W/src" && apt-get source -q "xen=$v" >"$W/xen-source.log" 2>&1); then
    echo "debian xen $v" >"$W/src/origin"; cat "$W/src/origin"; return 0
  fi
  rm -rf "$W/src"/xen-*/
  # Debian's version is <release>+<commits>-g<commit>-<debian revision>: the same code is xen.git's
  # commit, or the release tag it builds on (the hypervisor's changes since are security fixes)
  local up=${v%%+*}; up=${up%%-*}; local commit; commit=$(echo "$v" | sed -n 's/.*-g\([0-9a-f]\{7,\}\).*/\1/p')
  local git=${XENLAB_XEN_GIT:-}
  if [ -z "$git" ]; then
    git=$W/xen.git
    [ -d "$git" ] || git clone -q --bare --depth 1 --branch "RELEASE-$up" "${XENLAB_XEN_URL:-https://xenbits.xen.org/git-http/xen.git}" "$git" >>"$W/xen-source.log" 2>&1 \
      || { say "apt-get source xen=$v failed and xen.git cannot be cloned (set XENLAB_XEN_GIT): $W/xen-source.log"; exit 1; }
  fi
  local ref
  for ref in "$commit" "RELEASE-$up"; do
    [ -n "$ref" ] && git -C "$git" rev-parse -q --verify "$ref^{commit}" >/dev/null && break
    ref=
  done
  [ -n "$ref" ] || { say "$git has neither $commit nor RELEASE-$up"; exit 1; }
  mkdir -p "$W/src/xen-$up"
  git -C "$git" archive --format=tar "$ref" | tar x -C "$W/src/xen-$up"
  echo "xen.git $ref ($(git -C "$git" rev-parse --short=12 "$ref^{commit}"); Debian's $v: sources not on the mirror)" >"$W/src/origin"
  cat "$W/src/origin"
}
build_xen() {
  [ -s "$OUT/xen" ] && [ "$(cat "$OUT/xen.stamp" 2>/dev/null)" = "$XEN_STAMP" ] && return 0
  local t0; t0=$(date +%s)
  dl xen-hypervisor-4.20-arm64
  local origin; origin=$(xen_source)
  local S; S=$(ls -d "$W/src"/xen-*/ | head -1)
  rm -rf "$W/xhv"; dpkg-deb -x "$(debfile xen-hypervisor-4.20-arm64)" "$W/xhv"
  local cfg; cfg=$(ls "$W/xhv"/boot/xen-*.config | head -1)
  { grep -v -e 'CONFIG_EXPERT' -e 'CONFIG_IOREQ_SERVER' "$cfg"; echo CONFIG_EXPERT=y; echo CONFIG_IOREQ_SERVER=y; } \
    >"$S/xen/.config"
  local mk=(make -C "$S/xen" XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- -j"$(nproc)")
  "${mk[@]}" olddefconfig >"$W/xen-build.log" 2>&1
  grep -qx CONFIG_IOREQ_SERVER=y "$S/xen/.config" || { say "olddefconfig dropped CONFIG_IOREQ_SERVER"; exit 1; }
  "${mk[@]}" >>"$W/xen-build.log" 2>&1 || { tail -30 "$W/xen-build.log" >&2; say "xen build failed"; exit 1; }
  cp "$S/xen/xen" "$OUT/xen.new" && mv "$OUT/xen.new" "$OUT/xen"
  cp "$S/xen/.config" "$OUT/xen.config"
  echo "$origin" >"$OUT/xen.origin"
  echo "$XEN_STAMP" >"$OUT/xen.stamp"
  echo "xen_build_s=$(( $(date +%s) - t0 ))" >"$OUT/xen-build-time.txt"
  say "hypervisor built in $(( $(date +%s) - t0 )) s from $origin"
}
[ "${XENLAB_STAGE:-all}" = xen ] || [ "${XENLAB_STAGE:-all}" = all ] && build_xen
[ "${XENLAB_STAGE:-all}" = xen ] && exit 0

# ---- 1b. the domU kernel: Debian's 6.12 with CONFIG_XEN_VIRTIO (grant_usage=1), small ----------
# Debian 13's arm64 kernel has `# CONFIG_XEN_VIRTIO is not set`: its virtio drivers cannot put
# grant references in their descriptors (xen,grant-dma). The source is the linux-source-6.12 deb
# (Debian's patched tree as a tarball; the mirror 404s the `linux` source package as it does
# xen's), the configuration tinyconfig + domu-kernel.config, every driver built in (no modules).
KSRC_PKG=linux-source-6.12
build_domu_kernel() {
  dl "$KSRC_PKG"
  local deb ver stamp t0 S B l bad=
  deb=$(debfile "$KSRC_PKG"); ver=$(dpkg-deb -f "$deb" Version)
  stamp="$KSRC_PKG $ver config $(sha256sum <"$HERE/domu-kernel.config" | cut -c1-16) $(aarch64-linux-gnu-gcc -dumpversion) v1"
  [ -s "$OUT/domu-Image" ] && [ "$(cat "$OUT/domu-Image.stamp" 2>/dev/null)" = "$stamp" ] && return 0
  t0=$(date +%s)
  rm -rf "$W/ksrc" "$W/kbuild"; mkdir -p "$W/ksrc" "$W/kbuild"
  dpkg-deb --fsys-tarfile "$deb" | tar xO --wildcards './usr/src/linux-source-*.tar.xz' | tar xJ -C "$W/ksrc"
  S=$(ls -d "$W/ksrc"/linux-source-*/ | head -1); B=$W/kbuild
  local mk=(make -C "$S" O="$B" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- -j"$(nproc)")
  { "${mk[@]}" tinyconfig && (cd "$B" && "$S/scripts/kconfig/merge_config.sh" -m .config "$HERE/domu-kernel.config") \
      && "${mk[@]}" olddefconfig; } >"$W/domu-kernel-build.log" 2>&1 \
    || { tail -30 "$W/domu-kernel-build.log" >&2; say "domU kernel configuration failed"; exit 1; }
  for l in $(grep '^CONFIG_' "$HERE/domu-kernel.config"); do grep -qx "$l" "$B/.config" || bad="$bad $l"; done
  [ -z "$bad" ] || { say "domU kernel: olddefconfig dropped:$bad ($W/domu-kernel-build.log)"; exit 1; }
  "${mk[@]}" Image >>"$W/domu-kernel-build.log" 2>&1 \
    || { tail -30 "$W/domu-kernel-build.log" >&2; say "domU kernel build failed"; exit 1; }
  cp "$B/arch/arm64/boot/Image" "$OUT/domu-Image.new" && mv "$OUT/domu-Image.new" "$OUT/domu-Image"
  cp "$B/.config" "$OUT/domu-kernel.config"
  echo "$stamp" >"$OUT/domu-Image.stamp"
  echo "domu_kernel_build_s=$(( $(date +%s) - t0 )) nproc=$(nproc)" >"$OUT/domu-kernel-build-time.txt"
  rm -rf "$W/ksrc" "$W/kbuild"   # ~1.5 GB; the cache is the Image
  say "domU kernel ($KSRC_PKG $ver) built in $(( $(date +%s) - t0 )) s"
}
case ${XENLAB_STAGE:-all} in all|domu-kernel) build_domu_kernel;; esac
[ "${XENLAB_STAGE:-all}" = domu-kernel ] && exit 0

# ---- 2. packages: the arm64 kernel, busybox, Xen's tools, python3 + cffi --------------------------
KPKG=$(apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-/{sub(/:arm64/, "", $2); print $2; exit}')
[ -n "$KPKG" ] || { say "no linux-image-arm64 in apt's lists"; exit 1; }
KVER=${KPKG#linux-image-}
# runtime closure, checked below against every ELF's NEEDED list (Debian 13 names: t64 libraries)
DOM0_PKGS="libc6 libgcc-s1 busybox-static xen-utils-4.20 xenstore-utils libxencall1 libxendevicemodel1
 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenhypfs1 libxenmisc4.20 libxenstore4
 libxentoolcore1 libxentoollog1 libyajl2 libncurses6 libncursesw6 libtinfo6 zlib1g liblzma5 libzstd1
 libbz2-1.0 liblzo2-2 libuuid1 libfdt1 libnl-3-200 libnl-route-3-200 libaio1t64
 libglib2.0-0t64 libpcre2-8-0 libffi8 libexpat1 libcrypt1 libsqlite3-0 libreadline8t64
 libssl3t64 libselinux1 libblkid1 libmount1 libext2fs2t64 libpixman-1-0
 xen-utils-common python3.13-minimal libpython3.13-minimal libpython3.13-stdlib python3-cffi-backend
 python3-cffi python3-pycparser python3-ply python3-pluggy media-types"
# the host's python3.13 (amd64) that byte-compiles dom0's modules: same version, same .pyc
PYC_PKGS="libc6:amd64 zlib1g:amd64 libexpat1:amd64 python3.13-minimal:amd64 libpython3.13-minimal:amd64
 libpython3.13-stdlib:amd64 libffi8:amd64"
PK_STAMP=$(echo "$KPKG $DOM0_PKGS $PYC_PKGS" | sha256sum | cut -c1-16)
usrmerge() { mkdir -p "$1/usr/bin" "$1/usr/sbin" "$1/usr/lib"; ln -sfn usr/bin "$1/bin"; ln -sfn usr/sbin "$1/sbin"; ln -sfn usr/lib "$1/lib"; }
unpack_all() {
  [ "$(cat "$W/x/.stamp" 2>/dev/null)" = "$PK_STAMP" ] && return 0
  local p
  # shellcheck disable=SC2086
  dl "$KPKG" $DOM0_PKGS $PYC_PKGS
  rm -rf "$W/x" "$W/pyc"; mkdir -p "$W/x" "$W/pyc"; usrmerge "$W/x"; usrmerge "$W/pyc"
  for p in "$KPKG" $DOM0_PKGS; do dpkg-deb -x "$(debfile "$p")" "$W/x"; done
  for p in $PYC_PKGS; do dpkg-deb -x "$(debfile "${p%:amd64}" "$p")" "$W/pyc"; done
  echo "$PK_STAMP" >"$W/x/.stamp"
}
unpack_all
X=$W/x; KDIR=$X/usr/lib/modules/$KVER
if [ ! -s "$OUT/Image" ] || [ "$OUT/Image" -ot "$X/.stamp" ]; then
  gzip -dc "$X/boot/vmlinuz-$KVER" >"$OUT/Image.new" 2>/dev/null || cp "$X/boot/vmlinuz-$KVER" "$OUT/Image.new"
  mv "$OUT/Image.new" "$OUT/Image"
fi
pyc_python() {  # python3.13 for amd64 from $W/pyc, run by its own loader (the host's libc may be older)
  local R=$W/pyc
  PYTHONHOME=$R/usr PYTHONNOUSERSITE=1 "$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
    --library-path "$R/usr/lib/x86_64-linux-gnu" "$R/usr/bin/python3.13" "$@"
}

find "$KDIR/kernel" -name '*.ko*' | awk -F/ '{n=$NF; sub(/\.ko.*/, "", n); gsub(/-/, "_", n); print n, $0}' >"$W/modindex"
sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$KDIR/modules.builtin" >"$W/builtin"
WHO=xenlab; . "$REPO/scripts/guestkit/modules.sh"   # addmods DIR MOD..., pack DIR (shared with guestkit/build.sh)
BB_APPLETS="sh ash mount umount insmod mkdir cat echo sleep grep sed awk cut tr ls ln rm cp mv ps kill
 dd md5sum sync poweroff reboot halt setsid cttyhack ip date uname head tail wc sort uniq od stty
 timeout adjtimex printf test [ [[ env true false find chmod mknod seq tee expr hexdump dmesg nproc
 basename dirname readlink free df du xargs which pidof usleep uptime nc ping"
applets() { local a; for a in $BB_APPLETS; do ln -sf busybox "$1/bin/$a"; done; }

# ---- 3. the domU initramfs: the guest kit's init behind a shell on the virtio console ---------
DU=$W/domu; rm -rf "$DU"; mkdir -p "$DU"/{dev,proc,sys,tmp,etc,mnt}; usrmerge "$DU"; mkdir -p "$DU/lib/modules"
cp "$X/usr/bin/busybox" "$DU/bin/busybox"; applets "$DU"
# + Xen's PV block and net frontends: benchmarks/xenlab_pv.py compares vdm with blkback/netback
addmods "$DU" virtio_mmio virtio_blk virtio_net virtio_rng xen_blkfront xen_netfront
install -m 755 "$REPO/scripts/guestkit/init.sh" "$DU/init.kit"
install -m 755 "$HERE/domu-init.sh" "$DU/init"
install -m 755 "$HERE/domu-bench.sh" "$DU/bench.sh"
pack "$DU" | gzip -6n >"$OUT/domu.cpio.gz"

# ---- 4. the dom0 initramfs -----------------------------------------------------------------------
D=$W/dom0; rm -rf "$D"; mkdir -p "$D"
( cd "$X" && tar cf - --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/locale \
    --exclude=./usr/share/info --exclude=./usr/share/lintian --exclude=./boot --exclude=./usr/lib/modules \
    --exclude=./usr/lib/python3.13/ensurepip --exclude=./usr/lib/python3.13/idlelib \
    --exclude=./usr/lib/python3.13/tkinter --exclude=./usr/lib/python3.13/test \
    --exclude='./usr/lib/python3.13/pydoc_data' --exclude=./usr/lib/xen-4.20/boot \
    --exclude=./usr/lib/firmware --exclude='./usr/lib/linux-image-*' --exclude=./usr/lib/aarch64-linux-gnu/gconv \
    . ) | (cd "$D" && tar xf -)
mkdir -p "$D"/{dev,proc,sys,tmp,run,mnt,var/run,var/log/xen,var/lib/xen,var/lib/xenstored,lab,etc} "$D/lib/modules"
rm -f "$D/bin/sh"; applets "$D"
ln -sf python3.13 "$D/usr/bin/python3"
addmods "$D" xen_evtchn xen_privcmd xen_gntdev xen_gntalloc xenfs virtio_mmio virtio_blk tun xen_blkback xen_netback
# this checkout's vdm, pure Python, into the dom0 python's dist-packages (no deps: Debian's above)
VP=$W/vdm-pkgs; build_vdm_pkgs "$VP"
cp -a "$VP"/. "$D/usr/lib/python3/dist-packages/"
install -m 755 "$HERE/dom0-init.sh" "$D/init"
install -m 755 "$HERE/dom0-peer.py" "$D/lab/peer.py"
install -m 755 "$HERE/pv-hotplug.sh" "$D/lab/pv-hotplug"
# byte-compile (the .debs ship no .pyc; compiling at import costs seconds per module under TCG)
# with Debian 13's amd64 python3.13: the same version as dom0's, so the same .pyc files
pyc_python -m compileall -q -s "$D" -p / "$D/usr/lib/python3.13" "$D/usr/lib/python3/dist-packages" \
  >"$W/compileall.log" 2>&1 || say "warning: compileall reported errors (some modules are compiled at import): $W/compileall.log"
ls "$D/usr/lib/python3/dist-packages/vdm/__pycache__/"*.cpython-313.pyc >/dev/null 2>&1 \
  || say "warning: vdm was not byte-compiled for 3.13 (slower start): $W/compileall.log"
cp "$OUT/Image" "$OUT/domu-Image" "$OUT/domu.cpio.gz" "$D/lab/"
# every ELF's NEEDED must resolve inside the tree
missing=$( find "$D" -type f \( -name '*.so*' -o -perm -u+x \) | while read -r f; do
      [ "$(head -c 4 "$f")" = $'\x7fELF' ] || continue
      aarch64-linux-gnu-readelf -d "$f" 2>/dev/null | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'
    done | sort -u | while read -r so; do
      [ -e "$D/usr/lib/aarch64-linux-gnu/$so" ] || [ -e "$D/usr/lib/$so" ] || [ -e "$D/usr/lib/xen-4.20/lib/$so" ] || echo "$so"
    done ) || true
[ -z "$missing" ] || say "warning: unresolved libraries in dom0 (ok if unused): $(echo $missing)"
pack "$D" >"$OUT/dom0.cpio"

{ echo "kernel_package=$KPKG $(dpkg-deb -f "$(debfile "$KPKG")" Version)"
  echo "xen_source=$(cat "$OUT/xen.origin" 2>/dev/null)"
  echo "domu_kernel=$(cat "$OUT/domu-Image.stamp")"
  for p in xen-utils-4.20 python3.13-minimal python3-cffi-backend busybox-static; do
    echo "$p=$(dpkg-deb -f "$(debfile "$p")" Version)"; done
  echo "dom0_modules=$(tr '\n' ' ' <"$D/etc/modules")"
  echo "domu_modules=$(tr '\n' ' ' <"$DU/etc/modules")"; } >"$OUT/lab.txt"
say "built in $OUT ($(( $(date +%s) - t_start )) s): $(du -sh "$OUT/dom0.cpio" | cut -f1) dom0 initramfs"
