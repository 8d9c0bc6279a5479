"""``--rng [source=]FILE[,rate=N][,period=MS]`` and ``[[rng]]`` as vdm reads them; the plugin as
``vdm list-plugins`` shows it next to the others (no second ``rng`` type)."""

from __future__ import annotations

import json
import os

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm.errors import UserError
from vdm.registry import DeviceContext, registration_problem
from vdm_virtio_rng import plugin
from vdm_virtio_rng.config import RngConfig

from tests.core.installed import run_vdm


def parse(text: str) -> RngConfig:
    return parse_option_string(RngConfig, text, "--rng", "source")


def test_qemu_like_options():
    assert parse("") == RngConfig(source="/dev/urandom", rate=0, period=1000)
    assert parse("/dev/random").source == "/dev/random"
    c = parse("source=/srv/pool.bin,rate=4096,period=250")
    assert (c.source, c.rate, c.period, c.quota) == ("/srv/pool.bin", 4096, 250, 1024)
    assert parse("rate=6400,period=10").quota == 64  # the least a window may give
    assert parse("").quota == 0  # no limit
    assert config_from_mapping(RngConfig, {"source": "/x", "rate": 1000}, "[rng]").rate == 1000


@pytest.mark.parametrize(
    "text, says",
    [("rate=-1", "rate must be"), ("period=0", "period must be"), ("period=3600001", "period must be"),
     ("/dev/urandom,speed=3", "unknown option"), ("rate=fast", "rate"),
     ("rate=320,period=100", "gives 32 bytes per window; give at least 64")],
)
def test_bad_options_are_one_line(text, says):
    with pytest.raises(UserError) as e:
        parse(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_registration_and_bad_sources_are_one_line(tmp_path):
    got = []
    plugin.vdm_register_devices(got.append)
    (dt,) = got
    assert registration_problem("devices", dt) is None
    assert (dt.name, dt.cli_flag, dt.toml_key, dt.virtio_id) == ("rng", "--rng", "rng", 4)
    os.mkfifo(tmp_path / "fifo")
    bad = [(tmp_path / "nope", "No such file"), (tmp_path / "fifo", "FIFO"), (tmp_path, "regular")]
    for source, says in bad:
        with pytest.raises(UserError) as e:
            dt.create(parse(str(source)), DeviceContext())
        assert says in str(e.value) and str(source) in str(e.value) and "\n" not in str(e.value)
    dev = dt.create(parse(""), DeviceContext())
    try:
        assert dev.device_id == 4
    finally:
        dev.close()


def test_list_plugins_shows_one_rng_type_and_no_conflict():
    proc = run_vdm(["list-plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert listing["conflicts"] == []
    (rec,) = [r for r in listing["plugins"] if "rng" in r["provides"].get("devices", [])]
    got = (rec["name"], rec["distribution"], rec["status"], rec["api"])
    assert got == ("virtio-rng", "vdm-rng", "available", 2)
    assert rec["deprecations"] == []
