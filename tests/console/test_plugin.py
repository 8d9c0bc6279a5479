"""The console device type: options, TOML tables, and what create() builds on a VM."""

from __future__ import annotations

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm.errors import UserError
from vdm.hookspecs import vmmimpl
from vdm.registry import DeviceContext
from vdm.vmm import Vmm
from vdm_console import plugin
from vdm_console.config import ConsoleConfig
from vdm_console.uart import Uart16550
from vdm_console.virtio import VirtioConsole


class FakeHypervisor:
    """Just the VMM hooks a UART needs: port I/O routing and IRQ levels."""

    def __init__(self) -> None:
        self.pio: dict[int, tuple[int, object, str]] = {}
        self.irq_levels: list[tuple[int, bool]] = []

    @vmmimpl
    def vmm_register_pio(self, port, count, handler, owner):
        self.pio[port] = (count, handler, owner)
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq, level):
        self.irq_levels.append((irq, level))
        return True


def registered():
    types = []
    plugin.vdm_register_devices(types.append)
    (dt,) = types
    return dt


def parse(text: str) -> ConsoleConfig:
    dt = registered()
    return parse_option_string(dt.config, text, dt.cli_flag, dt.positional)


def test_device_type():
    dt = registered()
    assert (dt.name, dt.cli_flag, dt.positional, dt.toml_key) == ("console", "--console", "kind", "console")
    assert dt.config is ConsoleConfig


def test_options_from_command_line_and_toml(tmp_path):
    cfg = parse("virtio,backend=socket:/run/vm.sock,ports=org.qemu.guest_agent.0=pty;log=null")
    assert cfg.kind == "virtio" and cfg.backend == "socket:/run/vm.sock"
    assert cfg.ports == "org.qemu.guest_agent.0=pty;log=null"
    table = {"kind": "serial", "port": "com2", "backend": "pty"}
    cfg = config_from_mapping(ConsoleConfig, table, "[console]")
    assert (cfg.kind, cfg.port, cfg.backend) == ("serial", "com2", "pty")
    assert parse("serial") == ConsoleConfig()


@pytest.mark.parametrize(
    "text,error",
    [("tty", "kind"), ("serial,backend=telnet", "unknown backend"), ("serial,port=com5", "port"),
     ("serial,backend=file", "needs a path"), ("serial,ports=a=null", "kind=virtio"),
     ("virtio,ports=noequals", "NAME=BACKEND"), ("virtio,ports=a=null;a=pty", "twice"),
     ("virtio,multiport=off,ports=a=null", "multiport")],
)
def test_bad_options_are_one_clear_error(text, error):
    with pytest.raises(UserError, match=error):
        parse(text)


def test_create_serial_registers_a_uart_on_com_port(tmp_path):
    hv = FakeHypervisor()
    vmm = Vmm(hv)
    log = tmp_path / "serial.log"
    dev = plugin.create(parse(f"serial,port=com2,backend=file:{log}"), DeviceContext(vmm=vmm))
    try:
        assert isinstance(dev, Uart16550)
        count, handler, _ = hv.pio[0x2F8]
        assert count == 8 and handler is dev
        for c in b"ok\n":
            handler.write(0, 1, c)
        assert log.read_bytes() == b"ok\n"
        handler.write(4, 1, 0x08)  # OUT2
        handler.write(1, 1, 0x02)  # THR empty interrupt
        assert hv.irq_levels[-1] == (3, True)  # COM2 is IRQ 3
    finally:
        dev.close()
        vmm.close()


def test_create_serial_without_port_io_is_a_user_error():
    with pytest.raises(UserError, match="port I/O"):
        plugin.create(parse("serial,backend=null"), DeviceContext(vmm=None))


def test_create_virtio_with_named_ports():
    dev = plugin.create(parse("virtio,backend=null,ports=a.b=null;c=null"), DeviceContext())
    try:
        assert isinstance(dev, VirtioConsole)
        assert [(p.id, p.name, p.console) for p in dev.ports] == [(0, None, True), (1, "a.b", False),
                                                                  (2, "c", False)]
        assert len(dev.queues) == 8
    finally:
        dev.close()
