"""``--9p DIR,TAG[,ro]`` and ``[[9p]]`` tables as vdm reads them; bad input is one clear line."""

from __future__ import annotations

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm.errors import UserError
from vdm.registry import DeviceContext, registration_problem
from vdm_9p import plugin
from vdm_9p.config import NinepConfig


def parse(text: str) -> NinepConfig:
    return parse_option_string(NinepConfig, text, "--9p", "path")


def test_kvmtool_syntax():
    assert (parse("/srv/share,hostshare,ro").path, parse("/srv/share,hostshare,ro").tag) == (
        "/srv/share",
        "hostshare",
    )
    assert parse("/srv/share,hostshare,ro").ro and not parse("/srv/share,hostshare").ro
    assert parse("/srv/share,tag=t2").tag == "t2"
    assert parse("/srv/share/").tag == "share"  # no tag: the directory's name
    assert config_from_mapping(NinepConfig, {"path": "/x", "tag": "y", "ro": True}, "[9p]").ro


@pytest.mark.parametrize(
    "text, says",
    [("/x,a,b", "unknown option 'b'"), ("/x," + "t" * 300, "mount tag"), ("/x,a,queue_size=3", "queue_size")],
)
def test_bad_options_are_one_line(text, says):
    with pytest.raises(UserError) as e:
        parse(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_registration_and_missing_directory(tmp_path):
    got = []
    plugin.vdm_register_devices(got.append)
    (dt,) = got
    assert registration_problem("devices", dt) is None
    assert (dt.cli_flag, dt.toml_key, dt.virtio_id) == ("--9p", "9p", 9)
    with pytest.raises(UserError) as e:
        dt.create(parse(f"{tmp_path}/nope,t"), DeviceContext())
    assert "not a directory" in str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError):
        dt.create(parse(f"{tmp_path}/file,t"), DeviceContext())
    dev = dt.create(parse(f"{tmp_path},t,ro"), DeviceContext())
    try:
        assert dev.export.readonly and dev.config_space() == b"\x01\x00t"
    finally:
        dev.close()


def test_a_dev_root_share_gives_vdm_run_the_root_parameters(tmp_path):
    """kvmtool's sandbox: ``--9p DIR,/dev/root`` is the guest's root (kernel or kit initramfs mounts it)."""
    texts = ("/dev/root", "/dev/root,ro", "t")
    made = [plugin.create(parse(f"{tmp_path},{text}"), DeviceContext()) for text in texts]
    try:
        rw, ro, other = (d.guest_params for d in made)
        assert rw == "root=/dev/root rootfstype=9p rw rootflags=trans=virtio,version=9p2000.L,msize=262144"
        assert ro == rw.replace(" rw ", " ro ")
        assert other is None  # any other tag is a share the guest mounts itself
        assert made[0].config_space() == b"\x09\x00/dev/root"
    finally:
        for d in made:
            d.close()
