# Sourced by scripts/guestkit/build.sh and scripts/xenlab/build.sh: Linux modules into an initramfs.
# Needs: W (work folder holding "modindex" (NAME PATH per line) and "builtin" (one NAME per
# line)), KVER (for messages); optional WHO (prefix of error lines).

# addmods DIR MOD...: copy modules and their dependencies (from each .ko's "depends="), deps first,
# into DIR/lib/modules/NAME.ko; appended signatures are cut off (checking them is pure guest work,
# slow where guest kernel code is emulated); the load order goes to DIR/etc/modules.
addmods() {
  local root=$1; shift
  declare -A seen=(); local order=()
  add() {
    local m=${1//-/_} f d k
    [ -n "${seen[$m]:-}" ] && return 0; seen[$m]=1
    grep -qx "$m" "$W/builtin" && return 0
    f=$(awk -v m="$m" '$1 == m {print $2; exit}' "$W/modindex")
    [ -n "$f" ] || { echo "${WHO:-build}: module $m not found in $KVER" >&2; exit 1; }
    k=$root/lib/modules/$m.ko
    case $f in *.xz) xz -dc "$f";; *.zst) zstd -qdc "$f";; *.gz) gzip -dc "$f";; *) cat "$f";; esac >"$k"
    if [ "$(tail -c 28 "$k")" = "~Module signature appended~" ]; then
      d=$(tail -c 32 "$k" | head -c 4 | od -An -tu1 | awk '{print $1*16777216+$2*65536+$3*256+$4}')
      truncate -s $(( $(stat -c %s "$k") - d - 40 )) "$k"
    fi
    for d in $(tr '\0' '\n' <"$k" | sed -n 's/^depends=//p' | tr , ' '); do add "$d"; done
    order+=("$m")
  }
  for m in "$@"; do add "$m"; done
  printf '%s\n' "${order[@]}" >"$root/etc/modules"
}

# pack DIR: a newc cpio of DIR on stdout, sorted, owned by root (reproducible)
pack() { (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet --owner 0:0); }
