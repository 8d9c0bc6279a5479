#!/usr/bin/env bash
# Run the whole test suite (unit tests, then the real-guest tests under QEMU TCG and the KVM lab).
# Extra arguments go to pytest. pytest's exit status 5 ("no tests collected") is reported, not hidden.
# The 25 slowest steps and the 15 slowest test files (tests/conftest.py) are listed at the end, so a
# run that nears CI's budget shows where time went.
# Knobs (environment): VDM_FUZZ_SECONDS (fuzzing per target after its corpus replay, default 3),
# VDM_LAB_SHARED=0 (boot the KVM lab once per test instead of sharing one boot: tests/conftest.py),
# VDM_OTHER_PATH=all (the second pass below runs all of tests/core and tests/security, as it once did).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pytest --durations=25 "$@"
rc=$?
# The virtqueue has two paths (vdm/fastpath): the run above took the default one (compiled when
# built; the real-guest tests always run on it). The tests that walk chains through a Virtqueue in
# their own process (pop/_walk/chain_at: the code the fast path replaces) run again on the other
# path. The list is what tests/ringwalk_files.py found (run it as said there when adding ring tests);
# the other files of tests/core and tests/security never reach the ring walk (plugin loading, the CLI,
# config, sessions, images; and the KVM-lab drop-user test, a guest boot of ~40 s, whose vdm takes
# the default path like every real-guest test), so running them twice proved nothing more; nor
# tests/core/test_fastpath.py, which walks every ring on both paths in each run (it sets
# vdm.fastpath.ACTIVE itself). Skipped when arguments are given (they may select what to run).
RING_TESTS=(tests/core/test_virtqueue*.py tests/core/test_ring_stores.py
  tests/core/test_device.py tests/core/test_kick_budget.py tests/core/test_mmio*.py
  tests/core/test_pci_generated.py tests/core/test_vmm.py tests/core/test_control*.py
  tests/core/test_hooks.py tests/core/test_testing*.py
  tests/security/test_resource_bounds.py tests/security/test_hostile_qcow2.py)
[ "${VDM_OTHER_PATH:-}" = all ] && RING_TESTS=(tests/core tests/security)
if [ $# = 0 ]; then
  other=0
  [ "${VDM_FASTPATH:-}" = 0 ] && other=1
  echo "test.sh: the ring-walk tests again with VDM_FASTPATH=$other ($($PY -m vdm.cli.main --version)): ${RING_TESTS[*]}"
  VDM_FASTPATH=$other $PY -m pytest -q "${RING_TESTS[@]}"
  rc2=$?
  [ $rc = 0 ] && rc=$rc2
fi
if [ $rc = 5 ]; then
  echo "test.sh: pytest collected no tests (exit status 5)" >&2
  exit 1
fi
exit $rc
