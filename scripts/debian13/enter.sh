#!/bin/sh
# enter.sh ROOT [HOSTPATH...] -- CWD PROGRAM [ARG...] — run PROGRAM inside the Debian 13 root made by
# build.sh, with each HOSTPATH bind-mounted at the same path (a directory whole, so files made in it
# later are seen; a file alone). Meant to run in a private mount namespace, which it makes itself:
#   unshare --mount --propagation private -- scripts/debian13/enter.sh ROOT /tmp/x -- / qemu-system-x86_64 ...
# The root also gets /dev, /proc, /sys and a fresh tmpfs on /tmp; all mounts go with the namespace.
# PROGRAM is exec'ed in place of this script (same pid). Needs root.
set -e
if [ "${VDM_DEBIAN13_NS:-}" != 1 ]; then
  VDM_DEBIAN13_NS=1 exec unshare --mount --propagation private -- "$0" "$@"
fi
unset VDM_DEBIAN13_NS
root=${1:?usage: enter.sh ROOT [HOSTPATH...] -- CWD PROGRAM [ARG...]}; shift
[ -x "$root/usr/bin/env" ] || { echo "debian13: $root is not a built root (scripts/debian13/build.sh)" >&2; exit 1; }
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/tmp"
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
  p=$1; shift
  case $p in /*) ;; *) echo "debian13: $p: host paths must be absolute" >&2; exit 1 ;; esac
  if [ -d "$p" ]; then mkdir -p "$root$p"; else mkdir -p "$root${p%/*}"; : >>"$root$p"; fi
  mount --bind "$p" "$root$p"
done
[ "$#" -ge 2 ] || { echo "usage: enter.sh ROOT [HOSTPATH...] -- CWD PROGRAM [ARG...]" >&2; exit 1; }
shift; cwd=$1; shift
exec chroot "$root" /usr/bin/env --chdir="$cwd" "$@"
