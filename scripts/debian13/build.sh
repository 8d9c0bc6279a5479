#!/bin/bash
# build.sh [ROOT] — a Debian 13 (trixie) root for the frontends Debian 12 lacks: QEMU 10.0
# (qemu-system-x86) and libblkio 1.5 (libblkio1, libblkio-dev, with gcc and libc6-dev to build a C
# client against it). Default ROOT: $VDM_DEBIAN13_DIR or ~/.cache/vdm/debian13.
# Made with mmdebstrap from Debian's archive only (root mode; we run as root). Programs run in it
# through tests/realguest/debian13.py, which bind-mounts the host paths they need at the same paths.
# Cached and idempotent: when ROOT/.vdm-debian13.stamp matches the inputs (this script, the package
# list) the build ends at once; otherwise the root is made afresh in ROOT.new and renamed into place,
# so a half-made root is never used. Concurrent builds of one ROOT wait for each other (flock).
# Writes ROOT/.vdm-debian13.txt: the versions of the packages that matter (qemu, libblkio).
# Needs: mmdebstrap (apt-get install mmdebstrap; scripts/install.sh installs it), network access to
# deb.debian.org on the first build (~35 s, ~300 MB).
set -euo pipefail
ROOT=$(realpath -m "${1:-${VDM_DEBIAN13_DIR:-$HOME/.cache/vdm/debian13}}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=trixie
PACKAGES=qemu-system-x86,libblkio1,libblkio-dev,gcc,libc6-dev
STAMPFILE=$ROOT/.vdm-debian13.stamp
INFO=$ROOT/.vdm-debian13.txt

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"; flock 9

STAMP=$( { cat "$HERE/build.sh"; echo "$SUITE $PACKAGES"; } | sha256sum | cut -c1-64)
if [ "$(cat "$STAMPFILE" 2>/dev/null)" = "$STAMP" ] && [ -x "$ROOT/usr/bin/qemu-system-x86_64" ] \
   && [ -s "$INFO" ]; then
  echo "debian13: cached in $ROOT"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "debian13: building $ROOT needs root (mmdebstrap in root mode)" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "debian13: mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }

NEW=$ROOT.new
rm -rf "$NEW"
mmdebstrap --quiet --mode=root --variant=apt --include="$PACKAGES" "$SUITE" "$NEW" \
  http://deb.debian.org/debian >"$ROOT.log" 2>&1 \
  || { rm -rf "$NEW"; echo "debian13: mmdebstrap failed (log in $ROOT.log):" >&2; tail -5 "$ROOT.log" >&2; exit 1; }
ver() { chroot "$NEW" dpkg-query -W -f '${Version}' "$1"; }
{ echo "suite=$SUITE"
  echo "qemu-system-x86=$(ver qemu-system-x86)"
  echo "qemu_version=$(chroot "$NEW" qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([^ ]*\).*/\1/p')"
  echo "libblkio1=$(ver libblkio1)"
  echo "gcc=$(ver gcc)"; } >"$NEW/.vdm-debian13.txt"
echo "$STAMP" >"$NEW/.vdm-debian13.stamp"
rm -rf "$ROOT"; mv "$NEW" "$ROOT"
echo "debian13: built in $ROOT"; cat "$INFO"
