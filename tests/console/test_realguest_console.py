"""vdm's consoles under a real Linux guest: ``vdm run`` in the KVM lab (see tests/realguest).

One lab boot runs lab_console_script.py's ``consoles`` scenario: one guest kit boot at L3 with a
serial and a virtio console (two boots, one per console, until the suite had to get shorter: the
serial steps never depended on the virtio console being absent), in which

* virtio: the kit's ``console`` workload round-trips a token through /dev/hvc0 (with a UART as
  the guest's /dev/console, since the kit loads virtio_console as a module after /init opened it);
* serial: then Linux's 8250 driver's 16550A at 0x3f8 carries the kit's shell on ttyS0, which takes
  typed commands, and a 2.5 KiB paste arrives intact (interrupt-driven RX through the 16-byte FIFO).

Measured on the shared 2-core machine (other labs running): about 30 s from ``vdm run`` to the
shell at L3, and a 2560-byte paste in about 24 s (each character costs several exits to Python).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import vdm_lab

pytestmark = [pytest.mark.realguest, pytest.mark.kvmlab, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("lab_console_script.py")


def _unavailable(reason: str) -> None:
    if os.environ.get("VDM_REALGUEST_REQUIRED") or os.environ.get("CI"):
        pytest.fail(f"{reason} (required here: CI or VDM_REALGUEST_REQUIRED is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def lab() -> dict[str, str]:
    if vdm_lab.qemu_binary() is None:
        _unavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        kit = vdm_lab.guestkit()
    except vdm_lab.GuestKitError as e:
        _unavailable(f"the guest kit cannot be built: {str(e).strip().splitlines()[-1:]}")
        raise
    if not kit.lab_initrd.exists():
        _unavailable(f"{kit.lab_initrd} is missing")
    r = vdm_lab.run_in_kvm_lab(f"python3 {SCRIPT} consoles", timeout=3000, kit=kit)
    r.assert_ok()
    values = vdm_lab.parse_keyvalues(r.output)
    values["_describe"] = r.describe()
    return values


def _check(values: dict[str, str], prefix: str) -> None:
    err = values.get("consoles_error")  # the one guest both prefixes' keys come from
    assert err is None, f"{err}\nvdm: {values.get('consoles_vdm_log_tail')}\n{values['_describe']}"
    assert f"{prefix}_vdm_rc" in values, values["_describe"]


def test_linux_finds_a_16550a_and_types_through_it(lab):
    _check(lab, "serial")
    assert lab["serial_uart"] == "16550A"
    assert lab["serial_port"].upper().endswith("3F8")
    assert lab["serial_typed_command"] == "ok"
    assert int(lab["serial_rx_after"]) >= int(lab["serial_rx_before"]) + 2560  # the paste was received
    assert int(lab["serial_irq_count"]) > 0  # the driver ran on interrupts, not polling


def test_paste_through_the_uart_arrives_intact(lab):
    _check(lab, "serial")
    assert lab["serial_paste_md5_match"] == "True"


def test_serial_guest_powers_off_cleanly(lab):
    _check(lab, "serial")
    assert lab["serial_vdm_rc"] == "0"


def test_virtio_console_round_trip(lab):
    _check(lab, "virtio")
    assert lab["virtio_console_result"] == "ok", lab.get("virtio_console_detail")
    assert lab["virtio_vdm_rc"] == "0"
