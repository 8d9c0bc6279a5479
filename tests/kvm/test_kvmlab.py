"""vdm_kvm end to end in the KVM lab: the guest kit's Linux boots on our VMM with 1 and 2 vCPUs.

One lab session (QEMU TCG with kvm_amd inside, ~3-6 minutes) runs:
* the /dev/kvm unit tests (tests/kvm/test_kvm.py) on the lab's hardware-style KVM;
* tests.kvm.labboot: the kit's kernel + initrd with ``vdmtest=boot,smp vdmtest.exit=poweroff``
  and ``console=ttyS0``: the bzImage (64-bit boot protocol) with 1 vCPU and the uncompressed ELF
  vmlinux (PVH entry) with 2 -- the kernel's entry and the APs' start-up are independent of each
  other, so these two boots prove what the four pairs did (each boot 10-40 s in the nested lab);
* two more vmlinux boots with 1 vCPU that end in a reboot (the ACPI reset register, the i8042).
The boot times are printed (``-s`` shows them).
"""

from __future__ import annotations

import json
import shlex

import pytest
import vdm_lab

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]

#: (kernel, vCPUs) of the boots that end in a power-off
POWEROFF_BOOTS = [("vmlinuz", 1), ("vmlinux", 2)]


@pytest.fixture(scope="module")
def lab_run(kit: vdm_lab.GuestKit, kvm_lab) -> vdm_lab.LabResult:
    script = "\n".join([
        "set -x",
        "python3 -m pytest -q -p no:cacheprovider tests/kvm/test_kvm.py 2>&1 | tail -15",
        *(f"python3 -m tests.kvm.labboot --kit {shlex.quote(str(kit.dir))} --cpus {cpus} "
          f"--kernel {kernel} --workloads boot,smp --timeout 180 --retries 1"
          for kernel, cpus in POWEROFF_BOOTS),
        # reboots: through the FADT reset register (Linux's default) and the i8042 (reboot=k)
        f"python3 -m tests.kvm.labboot --kit {shlex.quote(str(kit.dir))} --kernel vmlinux --exit reboot "
        "--workloads boot --timeout 180 --retries 1",
        f"python3 -m tests.kvm.labboot --kit {shlex.quote(str(kit.dir))} --kernel vmlinux --exit reboot "
        "--workloads boot --timeout 180 --retries 1 --params reboot=k",
    ])
    r = kvm_lab(script, timeout=1500)
    r.assert_ok()
    return r


def _boots(r: vdm_lab.LabResult) -> list[dict]:
    prefix = "LABBOOT "
    return [json.loads(line[len(prefix) :]) for line in r.output.splitlines() if line.startswith(prefix)]


def _say_retries(b: dict) -> None:
    """Print the attempts the lab lost before /init (labboot --retries), so a rerun is never silent."""
    for e in b.get("earlier", []):
        print(f"\nKVM lab: an earlier boot of this guest failed before /init and was booted again: "
              f"{e['exit']} ({e['detail']}) after {e['run_s']} s; serial ended with:\n{e['serial_tail']}")


def test_unit_tests_pass_on_a_hardware_style_kvm(lab_run: vdm_lab.LabResult) -> None:
    summary = [line for line in lab_run.output.splitlines() if " passed" in line and " in " in line]
    assert summary, lab_run.describe()
    assert "failed" not in summary[-1] and "error" not in summary[-1], lab_run.describe()


@pytest.mark.parametrize(("kernel", "cpus"), POWEROFF_BOOTS)
def test_linux_boots_and_powers_off(lab_run: vdm_lab.LabResult, cpus: int, kernel: str) -> None:
    boots = [b for b in _boots(lab_run) if (b["kernel"], b["cpus"], b["how"]) == (kernel, cpus, "poweroff")]
    assert boots, lab_run.describe()
    b = boots[0]
    _say_retries(b)
    init, results, done = vdm_lab.parse_results(b["serial"])
    assert b["exit"] == "poweroff", f"{b['exit']}: {b['detail']}\n{b['serial'][-3000:]}"
    assert init is not None and done, b["serial"][-3000:]
    by_name = {r.name: r for r in results}
    assert by_name["boot"].ok
    assert by_name["smp"].ok and by_name["smp"]["cpus"] == str(cpus), by_name["smp"].line
    print(f"\nKVM lab, {kernel}, {cpus} vCPU(s): setup {b['setup_s']} s, start to poweroff {b['run_s']} s "
          f"(guest /init at {init['init_uptime_s']} s), exits {b['exits']}")


@pytest.mark.parametrize("params", ["", "reboot=k"])
def test_guest_reboot_ends_the_vm_as_a_reset(lab_run: vdm_lab.LabResult, params: str) -> None:
    boots = [b for b in _boots(lab_run) if (b["how"], b["params"]) == ("reboot", params)]
    assert boots, lab_run.describe()
    b = boots[-1]
    _say_retries(b)
    assert b["exit"] == "reset", f"{b['exit']}: {b['detail']}\n{b['serial'][-2000:]}"
    _, results, done = vdm_lab.parse_results(b["serial"])
    assert done and results[0].ok
    print(f"\nKVM lab reboot ({params or 'ACPI reset register'}): {b['detail']}, run {b['run_s']} s")
