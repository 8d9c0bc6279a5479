#!/usr/bin/env bash
# Install everything vdm needs on a Debian machine: the system packages its tests and demo use
# (QEMU, the guest kit's tools, Xen's libraries, ...) and the vdm distributions in editable mode
# with the test tools, and vdm-lab (lab/: the real-guest harness the tests, benchmarks and fuzz
# use). Idempotent; needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils        # real-guest tests (QEMU TCG, the KVM lab, qemu-storage-daemon), qcow2 interop
  mmdebstrap                        # scripts/debian13/build.sh: Debian 13's QEMU 10 and libblkio for the frontend tests
  cpio gzip lz4 xz-utils zstd fio util-linux e2fsprogs   # the guest kit (it downloads its kernel and busybox)
  iproute2                          # network namespaces and taps for vdm-net's tests
  libxen-dev                        # Xen's libraries and headers: vdm-xen's bindings are tested against them
  linux-libc-dev gcc python3-dev    # KVM/tun ABI checks compile a tiny C program against the kernel headers; gcc and Python's headers build the virtqueue fast path
  acpica-tools                      # iasl decompiles vdm-kvm's ACPI tables in its tests
  tmux strace                       # console tests drive a terminal; security tests trace file opens
  dpdk-dev                          # dpdk-testpmd (DPDK 22.11 virtio-user): a second vhost-user frontend for net
  libnbd0 nbdkit                    # vdm-blk's nbd protocol (libnbd, found at run time) and a second NBD server for its tests
  librbd1 ceph-mon ceph-osd ceph-common qemu-block-extra   # vdm-blk's rbd protocol (librbd, found at run time); its tests start a one-node Ceph; qsd's rbd driver for its benchmark
)

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install.sh: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check \
  -e "core[fast]" -e plugins/blk -e plugins/console -e plugins/net \
  -e plugins/kvm -e plugins/xen -e plugins/vhost-user -e plugins/9p -e plugins/rng -e plugins/balloon -e plugins/vsock -e lab -e ".[test]"
# the compiled virtqueue fast path (vdm/fastpath); without a compiler one line "fast path not built: ..."
$PY -m vdm.fastpath.build | sed 's/^/install.sh: /'
# vdm-blk's compiled serve step for raw images (vdm_blk/fastserve); optional in the same way
$PY -m vdm_blk.fastserve.build | sed 's/^/install.sh: /'
# vdm-net's compiled transmit step (vdm_net/fastsend); optional in the same way
$PY -m vdm_net.fastsend.build | sed 's/^/install.sh: /'
# vdm-kvm's pre-parsed KVM ABI (vdm_kvm/_abi_cache.py); without cffi's parser one line "kvm ABI cache not built: ..."
$PY -m vdm_kvm.abi_build | sed 's/^/install.sh: /'
# byte-compile the editable sources (pip does so for a regular install, not an editable one): a start
# that finds no .pyc compiles every module it imports -- seconds in the KVM lab, whose root is this one read-only
$PY -m compileall -q core/src plugins/*/src lab/src >/dev/null || echo "install.sh: some modules not byte-compiled"
echo "install.sh: vdm installed: $($PY -m vdm.cli.main --version)"
