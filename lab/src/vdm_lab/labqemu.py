"""QEMU with ``-accel kvm`` inside the KVM lab, with a vhost-user backend started next to it.

For QEMU device types that refuse TCG (``NEEDS_KVM``: QEMU 7.2's ``vhost-user-input-pci``,
"requires kvm") on a machine whose own /dev/kvm cannot boot Linux. The lab (:mod:`vdm_lab.kvmlab`)
runs a small Python program with this interpreter: it starts ``backend`` (e.g. ``vdm vhost-user
-s /mnt/tmp/dev.sock --NAME ""``), waits for ``wait_for`` (its socket) to appear, boots the kit
with :func:`vdm_lab.run_qemu` and ``accel="kvm"``, prints the guest's serial log and QEMU's exit
code, then stops the backend. Paths the lab writes must be under ``/mnt`` (a tmpfs there; the
host's root is read-only).

Invariant: the backend never outlives the lab run (it is terminated, then killed, in the lab).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .kit import GuestKit, guestkit
from .kvmlab import run_in_kvm_lab
from .layer import GuestSpec, initrd_with
from .results import GuestResult, parse_results

__all__ = ["run_qemu_in_kvm_lab"]

_PROGRAM = r'''
import json, os, subprocess, sys, time
import vdm_lab
a = json.loads(sys.argv[1])
os.makedirs("/mnt/tmp", exist_ok=True)
backend = None
if a["backend"]:
    log = open("/mnt/tmp/backend.log", "w")
    backend = subprocess.Popen(a["backend"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
try:
    deadline = time.monotonic() + 60
    while a["wait_for"] and not os.path.exists(a["wait_for"]):
        if backend is not None and backend.poll() is not None or time.monotonic() > deadline:
            print("LABQEMU BACKEND-FAILED rc=%s" % (backend.poll() if backend else None), flush=True)
            print(open("/mnt/tmp/backend.log").read(), flush=True)
            sys.exit(3)
        time.sleep(0.05)
    r = vdm_lab.run_qemu(a["args"], a["workloads"], a["params"], a["timeout"], kit=vdm_lab.guestkit(),
                         initrd=a["initrd"], memory_mib=a["memory_mib"], cpus=a["cpus"], accel="kvm",
                         on_line=lambda line: print(line, flush=True))
    print("LABQEMU RC=%s timed_out=%s" % (r.returncode, int(r.timed_out)), flush=True)
finally:
    if backend is not None:
        backend.terminate()
        try:
            backend.wait(10)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()
        print("--- backend log ---\n" + open("/mnt/tmp/backend.log").read(), flush=True)
'''


def run_qemu_in_kvm_lab(
    extra_args: Sequence[str] = (),
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    timeout: float = 900,
    *,
    backend: Sequence[str] = (),
    wait_for: str | None = None,
    kit: GuestKit | None = None,
    guest: GuestSpec | None = None,
    memory_mib: int | None = None,
    cpus: int = 1,
) -> GuestResult:
    """Boot the kit under QEMU ``-accel kvm`` in the KVM lab, ``backend`` running next to it.

    ``extra_args`` are QEMU's device arguments (sockets under ``/mnt/tmp``); ``wait_for`` a path
    the backend creates before QEMU may start. ``returncode`` is QEMU's (None when it never
    ended); ``log`` is the lab's whole output: the serial log, then the backend's log.
    """
    kit = kit or guestkit()
    inner = max(60.0, timeout - 180)  # the lab boots under TCG first
    with tempfile.TemporaryDirectory(prefix="vdmlab-labqemu-") as tmp:
        os.chmod(tmp, 0o755)
        initrd = initrd_with(kit, guest, Path(tmp) / "initrd", kit.initrd) if guest else kit.initrd
        program = Path(tmp) / "labqemu.py"
        program.write_text(_PROGRAM)
        os.chmod(program, 0o644)
        arguments = json.dumps({"backend": list(backend), "wait_for": wait_for, "args": list(extra_args),
                                "workloads": list(workloads), "params": dict(params or {}), "timeout": inner,
                                "initrd": str(initrd), "memory_mib": memory_mib, "cpus": cpus})
        script = f"exec {os.path.realpath(sys.executable)} {program} {_sh_quote(arguments)}\n"
        lab = run_in_kvm_lab(script, timeout, kit=kit)
    init, results, done = parse_results(lab.output)
    rc = None
    for line in lab.output.splitlines():
        if line.startswith("LABQEMU RC="):
            word = line.split()[1][len("RC="):]
            rc = int(word) if word.lstrip("-").isdigit() else None
    log = lab.output if lab.returncode is not None else lab.describe()
    return GuestResult(["(in the KVM lab)", *extra_args], log, rc, rc is None, lab.elapsed_s, init, results,
                       done, runner="QEMU -accel kvm in the KVM lab")


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
