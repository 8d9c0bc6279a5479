"""``vdm list-plugins`` says whether vdm-blk serves raw images through its compiled serve step
(issue 18: "`vdm list-plugins --json` says which path is active"), and why not when it does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vdm_blk import fastserve

VDM = [sys.executable, "-m", "vdm.cli.main", "list-plugins"]


def listing(extra: dict[str, str]) -> tuple[str, dict]:
    env = {**os.environ, "VDM_PLUGINS": "blk", **extra}
    text, out = (
        subprocess.run(c, capture_output=True, text=True, env=env, check=True).stdout
        for c in (VDM, [*VDM, "--json"])
    )
    data = json.loads(out)
    (blk,) = [r for r in data["plugins"] if r["name"] == "blk"]
    row = next(ln for ln in text.splitlines() if ln.startswith("blk "))
    return row, blk["parts"]["blk"]["fast path"]


def test_the_python_path_is_named_with_its_reason():
    row, part = listing({"VDM_FASTPATH": "0"})
    why = "python (core fast path off: VDM_FASTPATH=0)"
    assert part == {"compiled serve step": f"unavailable: {why}"}
    assert f"compiled serve step: unavailable: {why}" in row


def test_the_listing_matches_the_path_this_process_selected():
    # this process and the listing read the same environment and the same build
    row, part = listing({})
    if fastserve.ACTIVE:
        assert part == {"compiled serve step": "available"}
        assert "compiled serve step" not in row
    else:
        assert part == {"compiled serve step": f"unavailable: {fastserve.STATUS}"}
        assert f"compiled serve step: unavailable: {fastserve.STATUS}" in row
