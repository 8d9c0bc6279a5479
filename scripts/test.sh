#!/usr/bin/env bash
# Run the whole test suite (unit tests, then the real-guest tests under QEMU TCG and the KVM lab).
# Extra arguments go to pytest. pytest's exit status 5 ("no tests collected") is reported, not hidden.
# The 25 slowest steps and the 15 slowest test files (tests/conftest.py) are listed at the end, so a
# run that nears CI's budget shows where time went.
# Knobs (environment): VDM_FUZZ_SECONDS (fuzzing per target after its corpus replay, default 10),
# VDM_LAB_SHARED=0 (boot the KVM lab once per test instead of sharing one boot: tests/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pytest --durations=25 "$@"
rc=$?
# The virtqueue has two paths (vdm/fastpath): the run above took the default one (compiled when
# built; the real-guest tests always run on it); tests/core and tests/security run again on the
# other one. Skipped when arguments are given (they may select what to run).
if [ $# = 0 ]; then
  other=0
  [ "${VDM_FASTPATH:-}" = 0 ] && other=1
  echo "test.sh: tests/core and tests/security again with VDM_FASTPATH=$other ($($PY -m vdm.cli.main --version))"
  VDM_FASTPATH=$other $PY -m pytest -q tests/core tests/security
  rc2=$?
  [ $rc = 0 ] && rc=$rc2
fi
if [ $rc = 5 ]; then
  echo "test.sh: pytest collected no tests (exit status 5)" >&2
  exit 1
fi
exit $rc
