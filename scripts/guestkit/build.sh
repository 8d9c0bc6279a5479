#!/bin/bash
# build.sh OUTDIR — the vdm test guest kit, from Debian packages only (apt-get download; no compiler).
# Writes to OUTDIR:
#   vmlinuz               bzImage of Debian's linux-image-amd64 (one flavour for the guest and the lab)
#   vmlinux               the same kernel as an uncompressed ELF (for loaders that want an ELF/PVH)
#   initrd.cpio[.gz]      busybox-static + e2fsck.static + virtio/ext4 modules + init.sh as /init
#   initrd-fio.cpio[.gz]  the same plus the host's fio (Debian package) and its libraries (92 MB:
#                         boot the uncompressed one under TCG, gunzip there costs seconds)
#   lab-initrd.cpio.gz    the KVM lab's L2 initramfs: busybox + kvm_amd/9p/virtio/tun modules +
#                         ../kvmlab/l2-init.sh as /init
#   kit.txt               package versions and module load orders
# Cached and idempotent: downloads and the unpacked kernel stay in OUTDIR/.work; when kit.stamp
# matches the inputs (these scripts, the kernel flavour) the build ends at once. Concurrent builds
# of one OUTDIR wait for each other (flock). Needs: apt-get, dpkg-deb, cpio, gzip, xz, lz4, flock,
# fio (installed with apt-get when missing and running as root).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: $0 OUTDIR}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LABDIR=$(cd "$HERE/../kvmlab" && pwd)
FLAVOUR=amd64
GUEST_MODS="virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtio_rng crc32c_generic ext4 9pnet_virtio 9p"
LAB_MODS="virtio_pci 9pnet_virtio 9p kvm_amd tun"
mkdir -p "$OUT"
if [ -w "$OUT" ]; then exec 9>"$OUT/.lock"; flock 9; fi   # read-only (as in the KVM lab): no lock

STAMP=$( { cat "$HERE/build.sh" "$HERE/modules.sh" "$HERE/init.sh" "$LABDIR/l2-init.sh" "$LABDIR/kvmhold.py"; echo "$FLAVOUR"; } | sha256sum | cut -c1-64)
ALL="vmlinuz vmlinux initrd.cpio initrd.cpio.gz initrd-fio.cpio initrd-fio.cpio.gz lab-initrd.cpio.gz kit.txt"
have_all() { for f in $ALL; do [ -s "$OUT/$f" ] || return 1; done; }
if [ "$(cat "$OUT/kit.stamp" 2>/dev/null)" = "$STAMP" ] && have_all; then
  echo "guestkit: cached in $OUT"; exit 0
fi
[ -w "$OUT" ] || { echo "guestkit: $OUT is not built (or out of date) and is read-only here" >&2; exit 1; }
rm -f "$OUT/kit.stamp"

W=$OUT/.work; mkdir -p "$W/deb" "$W/x"
for t in lz4 xz cpio gzip; do
  command -v $t >/dev/null || { echo "guestkit: $t is missing (apt-get install ${t/xz/xz-utils})" >&2; exit 1; }
done
if ! command -v fio >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "guestkit: fio is missing (apt-get install fio)" >&2; exit 1; }
  apt-get install -y -qq --no-install-recommends fio >/dev/null
fi
apt-cache show busybox-static >/dev/null 2>&1 || apt-get update -qq
KPKG=$(apt-cache depends "linux-image-$FLAVOUR" | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$KPKG" ] || { echo "guestkit: no linux-image-$FLAVOUR in apt's lists" >&2; exit 1; }
cd "$W/deb"
for p in "$KPKG" busybox-static e2fsck-static; do
  ls "$p"_*.deb >/dev/null 2>&1 || { apt-get download -q "$p" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' -e '^Get:' -e '^Fetched' || true; }
  ls "$p"_*.deb >/dev/null 2>&1 || { echo "guestkit: cannot download $p" >&2; exit 1; }
  [ -e "$W/x/.$p" ] || { dpkg-deb -x "$p"_*.deb "$W/x" && touch "$W/x/.$p"; }
done
KVER=${KPKG#linux-image-}; KDIR=$W/x/lib/modules/$KVER; BB=$W/x/bin/busybox; E2FSCK=$W/x/sbin/e2fsck.static
[ -x "$BB" ] && [ -x "$E2FSCK" ] && [ -d "$KDIR" ] || { echo "guestkit: unpacked packages incomplete" >&2; exit 1; }
cp "$W/x/boot/vmlinuz-$KVER" "$OUT/vmlinuz.new" && mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"

# vmlinux: the first LZ4 (legacy frame) or XZ stream in the bzImage that decompresses to an ELF
if [ ! -s "$OUT/vmlinux" ] || [ "$OUT/vmlinux" -ot "$OUT/vmlinuz" ]; then
  for sig in '\x02\x21\x4c\x18:lz4' '\xfd\x37\x7a\x58\x5a\x00:xz'; do
    for off in $(LC_ALL=C grep -obUaP "${sig%%:*}" "$OUT/vmlinuz" | cut -d: -f1); do
      tail -c +$((off + 1)) "$OUT/vmlinuz" | "${sig##*:}" -dc >"$OUT/vmlinux.new" 2>/dev/null || true
      [ "$(head -c 4 "$OUT/vmlinux.new")" = $'\x7fELF' ] && break 2
    done
  done
  [ "$(head -c 4 "$OUT/vmlinux.new")" = $'\x7fELF' ] || { echo "guestkit: cannot extract vmlinux" >&2; exit 1; }
  mv "$OUT/vmlinux.new" "$OUT/vmlinux"
fi

# module lookup: name (with - or _) -> .ko path; built-in modules are skipped
find "$KDIR/kernel" -name '*.ko*' | awk -F/ '{n=$NF; sub(/\.ko.*/, "", n); gsub(/-/, "_", n); print n, $0}' \
  >"$W/modindex"
sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$KDIR/modules.builtin" >"$W/builtin"

# newroot DIR: busybox with every applet linked, the usual empty folders
newroot() {
  rm -rf "$1"; mkdir -p "$1"/{bin,sbin,dev,proc,sys,tmp,etc,mnt,lib/modules}
  cp "$BB" "$1/bin/busybox"
  for a in $("$BB" --list); do [ "$a" = busybox ] || ln -s busybox "$1/bin/$a"; done
}
WHO=guestkit; . "$HERE/modules.sh"   # addmods DIR MOD..., pack DIR (shared with xenlab/build.sh)

# the test guest
R=$W/root; newroot "$R"
cp "$E2FSCK" "$R/sbin/e2fsck"
addmods "$R" $GUEST_MODS
install -m 755 "$HERE/init.sh" "$R/init"
GUEST_ORDER=$(tr '\n' ' ' <"$R/etc/modules")
pack "$R" >"$OUT/initrd.cpio"; gzip -9nc "$OUT/initrd.cpio" >"$OUT/initrd.cpio.gz"

# the fio layer: the host's fio binary with every shared library at its own path
F=$W/fio; rm -rf "$F"; mkdir -p "$F/bin"; cp "$(command -v fio)" "$F/bin/fio"
for l in $(ldd "$(command -v fio)" | awk '/=>/{print $3} /^\t\//{print $1}'); do
  mkdir -p "$F$(dirname "$l")"; cp -L "$l" "$F$l"
done
pack "$F" | cat "$OUT/initrd.cpio" - >"$OUT/initrd-fio.cpio"
gzip -6nc "$OUT/initrd-fio.cpio" >"$OUT/initrd-fio.cpio.gz"

# the KVM lab's L2 initramfs
L=$W/labroot; newroot "$L"; mkdir -p "$L/host"
addmods "$L" $LAB_MODS
install -m 755 "$LABDIR/l2-init.sh" "$L/init"
install -m 644 "$LABDIR/kvmhold.py" "$L/kvmhold.py"
LAB_ORDER=$(tr '\n' ' ' <"$L/etc/modules")
pack "$L" | gzip -6n >"$OUT/lab-initrd.cpio.gz"

{ echo "kernel_package=$KPKG $(dpkg-deb -f "$W/deb/$KPKG"_*.deb Version)"
  echo "kernel_release=$KVER"
  echo "busybox-static=$(dpkg-deb -f "$W/deb"/busybox-static_*.deb Version)"
  echo "e2fsck-static=$(dpkg-deb -f "$W/deb"/e2fsck-static_*.deb Version)"
  echo "fio=$(dpkg-query -W -f '${Version}' fio 2>/dev/null || fio --version)"
  echo "guest_modules=$GUEST_ORDER"
  echo "lab_modules=$LAB_ORDER"; } >"$OUT/kit.txt"
echo "$STAMP" >"$OUT/kit.stamp"
echo "guestkit: built in $OUT"; cat "$OUT/kit.txt"
