#!/usr/bin/env bash
# Run the whole test suite (unit tests, then the real-guest tests under QEMU TCG and the KVM lab).
# Extra arguments go to pytest. pytest's exit status 5 ("no tests collected") is reported, not hidden.
# The 25 slowest steps are listed at the end, so a run that nears CI's budget shows where time went.
# Knobs (environment): VDM_FUZZ_SECONDS (fuzzing per target after its corpus replay, default 10),
# VDM_LAB_SHARED=0 (boot the KVM lab once per test instead of sharing one boot: tests/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pytest --durations=25 "$@"
rc=$?
if [ $rc = 5 ]; then
  echo "test.sh: pytest collected no tests (exit status 5)" >&2
  exit 1
fi
exit $rc
