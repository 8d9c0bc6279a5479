"""``vdm run``'s option handling that needs no VM: the default console, --console-backend, and what a
device plugin adds to the kernel command line."""

from __future__ import annotations

import argparse

import pytest
from vdm.cli.devices import device_configs
from vdm.errors import UserError
from vdm.plugins import load_plugins
from vdm_kvm.run import _default_console, add_arguments


def _parse(argv: list[str], only: list[str] | None = None) -> tuple[argparse.Namespace, object]:
    plugins = load_plugins(only)
    p = argparse.ArgumentParser()
    add_arguments(p, plugins)
    args = p.parse_args(argv)
    return args, plugins


def _console_configs(argv: list[str], doc: dict | None = None) -> list:
    args, plugins = _parse(argv)
    doc = _default_console(args, plugins, doc or {})
    return [cfg for dt, cfg in device_configs(args, plugins, doc) if dt.name == "console"]


def _consoles(argv: list[str], doc: dict | None = None) -> list[tuple[str, str]]:
    return [(cfg.kind, cfg.backend) for cfg in _console_configs(argv, doc)]


def test_a_guest_without_console_options_gets_a_serial_port_on_stdio() -> None:
    assert _consoles(["-k", "bzImage"]) == [("serial", "stdio")]


def test_console_backend_applies_to_the_default_serial_port() -> None:
    assert _consoles(["--console-backend", "null"]) == [("serial", "null")]


def test_console_backend_applies_to_every_console_on_the_command_line() -> None:
    got = _consoles(["--console", "serial", "--console", "virtio", "--console-backend", "pty"])
    assert got == [("serial", "pty"), ("virtio", "pty")]


def test_console_tables_of_a_vm_file_are_kept_and_get_the_command_line_backend() -> None:
    doc = {"console": [{"kind": "virtio", "multiport": True}]}
    assert _consoles([], doc) == [("virtio", "stdio")]
    (cfg,) = _console_configs(["--console-backend", "null"], doc)
    assert (cfg.kind, cfg.backend, cfg.multiport) == ("virtio", "null", True)


def test_console_backend_without_the_console_plugin_says_what_to_install() -> None:
    args, plugins = _parse(["--console-backend", "null"], only=["vdm-blk"])
    with pytest.raises(UserError, match="pip install vdm-console"):
        _default_console(args, plugins, {})


# A second SIGTERM during the clean stop (coreutils timeout signals vdm, then its process group):
# vdm run waits through vdm.session.StopSignal, held by tests/core/test_session.py
# (test_a_second_sigterm_during_shutdown_is_ignored,
# test_a_process_signalled_twice_from_outside_stops_cleanly).


class _PluginDevice:
    """What a third party's device may carry: guest_console / guest_params of any type."""

    name = "third-party"

    def __init__(self, **attrs: object) -> None:
        for k, v in attrs.items():
            setattr(self, k, v)


def test_a_device_kernel_parameters_are_taken_when_they_are_one_line() -> None:
    from vdm_kvm.run import _guest_words

    dev = _PluginDevice(guest_params="root=/dev/root rootfstype=9p", guest_console="hvc0")
    assert _guest_words(dev, "guest_params") == "root=/dev/root rootfstype=9p"
    assert _guest_words(dev, "guest_console") == "hvc0"
    assert _guest_words(_PluginDevice(), "guest_params") is None
    assert _guest_words(_PluginDevice(guest_params=""), "guest_params") is None


@pytest.mark.parametrize("value", [42, b"root=/dev/vda", ["console=hvc0"], "quiet\ninit=/bin/sh", "a\0b"])
def test_a_plugin_with_bad_kernel_parameters_gets_one_line_naming_the_device(value: object) -> None:
    # was: a TypeError from " ".join (int, bytes, list) out of vdm run, or the value on the command line
    from vdm_kvm.run import _guest_words

    with pytest.raises(UserError, match=r"'third-party': its guest_params is .*fix or update its plugin"):
        _guest_words(_PluginDevice(guest_params=value), "guest_params")


def test_a_plugin_property_that_raises_gets_one_line() -> None:
    from vdm_kvm.run import _guest_words

    class Broken(_PluginDevice):
        @property
        def guest_console(self) -> str:
            raise RuntimeError("not configured")

    with pytest.raises(UserError, match=r"device 'third-party': its guest_console raised"):
        _guest_words(Broken(), "guest_console")
