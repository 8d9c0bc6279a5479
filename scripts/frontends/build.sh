#!/bin/bash
# build.sh — build blkio_frontend (a libblkio vhost-user-blk client, see blkio_frontend.c) inside the
# Debian 13 root of scripts/debian13/build.sh (libblkio 1.5 and gcc live there, not on Debian 12) and
# print the path of the binary. The binary links Debian 13's libc, so it runs in that root too:
#   scripts/debian13/enter.sh ROOT BINDIR SOCKDIR -- / BINARY --path SOCK ...
# Cached under $VDM_FRONTENDS_DIR (default ~/.cache/vdm/frontends) by the hash of the source and of
# this script; never committed. Builds the Debian 13 root first if needed (root, network once).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=$(realpath -m "${VDM_DEBIAN13_DIR:-$HOME/.cache/vdm/debian13}")
OUTDIR=$(realpath -m "${VDM_FRONTENDS_DIR:-$HOME/.cache/vdm/frontends}")
bash "$REPO/scripts/debian13/build.sh" "$ROOT" >&2
HASH=$(cat "$HERE/blkio_frontend.c" "$HERE/build.sh" | sha256sum | cut -c1-16)
OUT=$OUTDIR/blkio_frontend-$HASH
if [ ! -x "$OUT" ]; then
  mkdir -p "$OUTDIR"
  TMP=$OUT.tmp.$$
  "$REPO/scripts/debian13/enter.sh" "$ROOT" "$HERE" "$OUTDIR" -- / \
    gcc -O2 -g -Wall -Wextra -o "$TMP" "$HERE/blkio_frontend.c" -lblkio >&2 \
    || { rm -f "$TMP"; echo "frontends: building blkio_frontend failed" >&2; exit 1; }
  find "$OUTDIR" -maxdepth 1 -name 'blkio_frontend-*' ! -name '*.tmp.*' -delete   # older builds
  mv "$TMP" "$OUT"
fi
echo "$OUT"
