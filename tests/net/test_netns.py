"""The namespace helper itself: isolation, clean-up, and the pieces the real-guest tests use."""

from __future__ import annotations

import os
import subprocess

from tests.net.netns import netns_unavailable


def test_namespace_is_private_and_removed_on_close(netns):
    assert netns.name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    netns.create_tap("vdmdummy0")
    assert subprocess.run(["ip", "link", "show", "vdmdummy0"], capture_output=True).returncode != 0
    # call() runs on a thread inside: it sees the dummy link, this thread does not
    assert netns.call(lambda: os.path.exists("/sys/class/net/vdmdummy0")) or netns.call(
        lambda: "vdmdummy0" in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    )
    name = netns.name
    netns.close()
    netns.close()  # idempotent
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_prepared_tap_and_fd_for_a_vmm(netns):
    netns.prepare_tap("vdmtap0", address="10.0.2.2/24")
    out = netns.run(["ip", "-4", "addr", "show", "vdmtap0"]).stdout
    assert "10.0.2.2/24" in out
    fd = netns.tap_fd("vdmtap0")
    from vdm_net.backends.tap import open_tap

    tap = open_tap(fd=fd)  # what a VMM given fd=N does
    assert tap.name == "vdmtap0"
    assert "LOWER_UP" in netns.run(["ip", "link", "show", "vdmtap0"]).stdout, "carrier once attached"
    tap.close()


def test_commands_and_processes_run_inside(netns):
    assert "vdmtap" not in netns.run(["ip", "link"]).stdout
    proc = netns.popen(["sleep", "60"])
    netns.close()
    assert proc.poll() is not None, "close() stops what the namespace started"


def test_unavailable_reason_is_none_here_or_says_why():
    why = netns_unavailable()
    assert why is None or why.startswith("needs")
