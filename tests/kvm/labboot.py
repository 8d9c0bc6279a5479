"""Boot the guest kit on vdm_kvm.machine and print one JSON line per boot (run inside the KVM lab).

    python3 -m tests.kvm.labboot --kit DIR --cpus 1 --cpus 2 --workloads boot,smp [--kernel vmlinux]

COM1 is tests.kvm.serial_capture.SerialCapture (IRQ 4 through KVM_IRQ_LINE). Each line:
``LABBOOT {"cpus": N, "exit": "poweroff", "detail": ..., "setup_s": ..., "run_s": ..., "exits": {...},
"serial": "...", "earlier": [...]}``.

``--retries N`` boots again (up to N times) when a boot ends wrongly *before the guest's /init
started* (no ``VDMTEST INIT`` on the serial port): the nested lab's guests -- QEMU's own as well
as vdm's -- now and then triple-fault or stall in early kernel boot. Each failed attempt is kept
in ``earlier`` (exit, detail, the serial's last lines) so the test can print it; a failure after
/init started is never retried.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from vdm_kvm.kvm import EXIT_NAMES
from vdm_kvm.machine import Machine, MachineConfig

from tests.kvm.serial_capture import SerialCapture


def boot(kit: str, cpus: int, workloads: str, mem_mib: int, timeout: float, params: str,
         kernel: str = "vmlinuz", exit_how: str = "poweroff") -> dict:
    t0 = time.monotonic()
    m = Machine(MachineConfig(mem_mib=mem_mib, cpus=cpus))
    try:
        serial = SerialCapture(irq=lambda level: m.vm.irq_line(4, level))
        m.vm.pio_bus.register(0x3F8, 8, serial, "com1")
        cmdline = f"console=ttyS0 quiet panic=-1 vdmtest={workloads} vdmtest.exit={exit_how} {params}"
        m.load_linux(f"{kit}/{kernel}", f"{kit}/initrd.cpio.gz", cmdline.strip())
        t1 = time.monotonic()
        m.start()
        ex = m.wait(timeout)
        t2 = time.monotonic()
        if ex is None:
            ex = m.stop()
            reason = "timeout"
        else:
            reason = ex.reason
        exits: dict[str, int] = {}
        for v in m.vm.vcpus:
            for k, n in v.exit_counts.items():
                exits[EXIT_NAMES.get(k, str(k))] = exits.get(EXIT_NAMES.get(k, str(k)), 0) + n
        return {"cpus": cpus, "kernel": kernel, "params": params, "how": exit_how,
                "exit": reason, "detail": ex.detail,
                "setup_s": round(t1 - t0, 3), "run_s": round(t2 - t1, 3), "exits": exits,
                "serial": serial.text(),
                "unclaimed_pio": m.vm.pio_bus.unclaimed_reads + m.vm.pio_bus.unclaimed_writes}
    finally:
        m.close()


def boot_with_retries(retries: int, expected_exit: str, **kw) -> dict:
    """``boot(**kw)``, again up to ``retries`` times while it fails before the guest's /init."""
    earlier: list[dict] = []
    while True:
        r = boot(**kw)
        r["earlier"] = earlier
        if r["exit"] == expected_exit or "VDMTEST INIT" in r["serial"] or len(earlier) >= retries:
            return r
        tail = "\n".join(r["serial"].splitlines()[-5:])
        earlier.append({"exit": r["exit"], "detail": r["detail"], "run_s": r["run_s"], "serial_tail": tail})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit", required=True)
    ap.add_argument("--cpus", type=int, action="append")
    ap.add_argument("--workloads", default="boot,smp")
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--params", default="")
    ap.add_argument("--exit", default="poweroff", choices=("poweroff", "reboot"),
                    help="how the guest ends (vdmtest.exit)")
    ap.add_argument("--kernel", action="append", choices=("vmlinuz", "vmlinux"),
                    help="the kit's bzImage or its uncompressed ELF (repeat for both)")
    ap.add_argument("--retries", type=int, default=0,
                    help="boot again when a boot fails before the guest's /init started")
    a = ap.parse_args(argv)
    for kernel in a.kernel or ["vmlinuz"]:
        for cpus in a.cpus or [1]:
            r = boot_with_retries(a.retries, "poweroff" if a.exit == "poweroff" else "reset", kit=a.kit,
                                  cpus=cpus, workloads=a.workloads, mem_mib=a.mem, timeout=a.timeout,
                                  params=a.params, kernel=kernel, exit_how=a.exit)
            print("LABBOOT " + json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
