"""``--vsock cid=N,path=PATH[,buf_size=N][,max_conns=N]`` and ``[[vsock]]`` as vdm reads them; the
plugin as ``vdm list-plugins`` shows it; bad options and paths are one line each."""

from __future__ import annotations

import json
import socket

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm.errors import UserError
from vdm.registry import DeviceContext, registration_problem
from vdm_vsock import plugin
from vdm_vsock.config import VsockConfig

from tests.core.installed import run_vdm


def parse(text: str) -> VsockConfig:
    return parse_option_string(VsockConfig, text, "--vsock", None)


def test_options():
    c = parse("cid=3,path=/tmp/v.sock")
    assert (c.cid, c.path, c.buf_size, c.max_conns) == (3, "/tmp/v.sock", 256 * 1024, 256)
    assert parse("cid=42,path=v,buf_size=8192,max_conns=8").buf_size == 8192
    assert config_from_mapping(VsockConfig, {"cid": 5, "path": "/x"}, "[vsock]").cid == 5


@pytest.mark.parametrize(
    "text, says",
    [("path=/tmp/v", "cid=3 to 4294967294"), ("cid=2,path=/tmp/v", "not 2"), ("cid=3", "path="),
     ("cid=3,path=/tmp/v,buf_size=10", "buf_size must be"), ("cid=3,path=/tmp/v,max_conns=0", "max_conns"),
     ("cid=3,path=/" + "a" * 100, "longer than"), ("cid=3,path=/tmp/v,port=1", "unknown option")],
)
def test_bad_options_are_one_line(text, says):
    with pytest.raises(UserError) as e:
        parse(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_registration_and_bad_paths_are_one_line(tmp_path):
    got = []
    plugin.vdm_register_devices(got.append)
    (dt,) = got
    assert registration_problem("devices", dt) is None
    assert (dt.name, dt.cli_flag, dt.toml_key, dt.virtio_id) == ("vsock", "--vsock", "vsock", 19)
    (tmp_path / "file").write_text("x")
    served = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    served.bind(str(tmp_path / "served"))
    served.listen(1)
    bad = [(tmp_path / "no" / "v.sock", "no such folder"), (tmp_path / "file", "not a socket"),
           (tmp_path / "served", "another process is listening")]
    for path, says in bad:
        with pytest.raises(UserError) as e:
            dt.create(parse(f"cid=3,path={path}"), DeviceContext())
        assert says in str(e.value) and "\n" not in str(e.value)
    served.close()
    dev = dt.create(parse(f"cid=3,path={tmp_path / 'v.sock'}"), DeviceContext())
    try:
        assert dev.device_id == 19 and (tmp_path / "v.sock").is_socket()
    finally:
        dev.close()
    assert not (tmp_path / "v.sock").exists()  # close removes what it listened on


def test_list_plugins_shows_vsock():
    proc = run_vdm(["list-plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    (rec,) = [r for r in json.loads(proc.stdout)["plugins"] if "vsock" in r["provides"].get("devices", [])]
    got = (rec["name"], rec["distribution"], rec["status"], rec["api"])
    assert got == ("vsock", "vdm-vsock", "available", 2)
