"""The net plugin: registration, the --network option string, and building a device from it."""

from __future__ import annotations

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm.errors import UserError
from vdm.plugins import load_plugins
from vdm.registry import DeviceContext
from vdm_net import plugin
from vdm_net.config import NetConfig
from vdm_net.device import VirtioNet


def parse(text: str) -> NetConfig:
    return parse_option_string(NetConfig, text, "--network", positional="mode")


def test_the_net_device_type_is_registered():
    plugins = load_plugins(only=["net"])
    dt = plugins.device_type("net")
    assert dt.config is NetConfig and dt.cli_flag == "--network" and dt.toml_key == "network"
    assert plugins.device_for_flag("--network") is dt


def test_kvmtool_style_options_parse():
    cfg = parse("mode=tap,tapif=vdmtap0,script=/etc/vdm-ifup,guest_mac=02:15:15:15:15:15,queues=4")
    assert (cfg.mode, cfg.tapif, cfg.script_path, cfg.queues) == ("tap", "vdmtap0", "/etc/vdm-ifup", 4)
    assert cfg.guest_mac_bytes("x") == bytes.fromhex("021515151515")
    assert parse("tap,fd=5").fd == 5
    assert parse("none").mode == "none"
    assert parse("tap,host_ip=192.168.33.1/24").host_ip == "192.168.33.1/24"
    assert parse("tap,script=none").script_path is None
    assert config_from_mapping(NetConfig, {"tapif": "t0", "mtu": 9000}, "[network]").mtu == 9000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mode=user", "must be one of"),
        ("queues=0", "queues must be between"),
        ("queues=2,fd=3", "fd= gives one queue"),
        ("guest_mac=01:00:5e:00:00:01", "multicast"),
        ("guest_mac=nonsense", "not a MAC address"),
        ("tapif=" + "x" * 16, "tapif must be"),
        ("mtu=20", "mtu must be"),
        ("queue_size=100", "power of two"),
        ("vhost=on", "unknown option"),
        ("host_ip=10.0.2.2/40", "IPv4 address"),
    ],
)
def test_bad_options_are_one_clear_error(text, message):
    with pytest.raises(UserError, match=message):
        parse(text)


def test_create_opens_the_tap_and_runs_the_script(netns, tmp_path):
    script = tmp_path / "ifup"
    script.write_text('#!/bin/sh\nip addr add 10.0.2.2/24 dev "$1" && ip link set "$1" up\n')
    script.chmod(0o755)
    cfg = parse(f"tap,tapif=vdmtap0,script={script},queues=2,host_mac=02:00:00:00:00:02")
    dev = netns.call(plugin.create, cfg, DeviceContext(vm_name="guest1"))
    try:
        assert isinstance(dev, VirtioNet) and len(dev.pairs) == 2
        out = netns.run(["ip", "addr", "show", "vdmtap0"]).stdout
        assert "10.0.2.2/24" in out and "02:00:00:00:00:02" in out
        assert dev.mac[0] == 0x02, "a locally administered default MAC"
    finally:
        dev.close()
    assert netns.run(["ip", "link", "show", "vdmtap0"], check=False).returncode != 0


def test_create_without_a_backend():
    dev = plugin.create(parse("none"), DeviceContext(vm_name="guest1"))
    assert isinstance(dev, VirtioNet) and dev.tap is None
    assert dev.config_space()[6:8] == b"\0\0", "link down"
