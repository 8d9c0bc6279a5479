#!/bin/bash
# run.sh [--timeout S] [--out DIR] [--memory MIB] [--cpus N] [-v] 'command …'
# Boots the KVM lab (QEMU TCG -cpu max, kvm_amd inside; see README.md), runs the shell command in
# the host's root (read-only 9p, chroot, /mnt writable), prints its output as it comes and exits
# with its exit code (255 when the lab never finished). -v also prints the L2 console.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$(command -v python3)}
exec "$PY" "$ROOT/tests/realguest/harness.py" lab "$@"
