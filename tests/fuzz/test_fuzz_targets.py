"""Every fuzz target runs for a bounded time from its committed corpus, then its regressions.

``VDM_FUZZ_SECONDS`` (default 30) sets the time per target.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))
import run_all  # noqa: E402

SECONDS = int(os.environ.get("VDM_FUZZ_SECONDS", "30"))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")


@pytest.mark.parametrize("target", run_all.targets())
def test_fuzz_target(target, tmp_path):
    r = run_all.run_target(target, SECONDS, tmp_path)
    print(f"fuzz {target}: execs={r.get('execs')} cov={r.get('cov')} regressions={r.get('regressions', 0)}")
    assert r["returncode"] == 0, f"{target} failed; reproduce: {r['command']}\n{r.get('tail', '')}"
    assert r.get("execs", 0) > 0, "the target ran no input"
