"""Device options: ``--disk disk.img,ro,cache=none`` strings and TOML tables into dataclasses.

Every error is one line that names the device, the option and what it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vdm.config import config_from_mapping, describe_options, load_toml, parse_option_string
from vdm.errors import UserError


@dataclass
class DiskConfig:
    path: str
    ro: bool = False
    direct: bool = False
    queues: int = 1
    serial: Optional[str] = None
    size: Optional[int] = None
    cache: str = field(default="writeback", metadata={"choices": ("writeback", "none", "unsafe")})
    ratio: float = 1.0


@dataclass
class NoRequired:
    verbose: bool = False
    level: int = field(default=0, metadata={"choices": (0, 1, 2)})
    read_only: bool = False
    max_size: int = 0


@dataclass
class Checked:
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be at least 1")


def parse(text: str, cls: type = DiskConfig):
    return parse_option_string(cls, text, "--disk", positional="path")


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith("--disk: ")
    return msg


# ---- option strings -------------------------------------------------------------------------------


def test_positional_bools_and_values():
    cfg = parse("disk.img,ro,cache=none,queues=4,serial=abc,size=0x1000,ratio=0.5")
    assert cfg == DiskConfig(
        path="disk.img", ro=True, cache="none", queues=4, serial="abc", size=4096, ratio=0.5
    )


def test_defaults_and_explicit_path():
    assert parse("path=/dev/vdb") == DiskConfig(path="/dev/vdb")
    assert parse("disk.img") == DiskConfig(path="disk.img")


@pytest.mark.parametrize("word, value", [("on", True), ("yes", True), ("1", True), ("TRUE", True),
                                         ("off", False), ("no", False), ("0", False), ("False", False)])
def test_boolean_spellings(word, value):
    assert parse(f"d.img,ro={word}").ro is value


def test_dashes_and_empty_items():
    # ``read-only`` names the field read_only; empty items between commas are skipped
    assert parse_option_string(NoRequired, "verbose,,level=2,read-only,max-size=9", "--x") == NoRequired(
        verbose=True, level=2, read_only=True, max_size=9
    )
    assert config_from_mapping(NoRequired, {"max-size": 3}, "[[x]]").max_size == 3


def test_a_value_containing_equals_signs():
    assert parse("d.img,serial=a=b").serial == "a=b"


def test_first_item_that_is_a_bool_option_is_not_the_path():
    with pytest.raises(UserError) as e:
        parse("ro")
    assert one_line_error(e) == "--disk: missing option path"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("d.img,bogus", "--disk: unknown option 'bogus' (known: path, ro, direct, queues, serial, size, "
                        "cache, ratio)"),
        ("d.img,bogus=1", "--disk: unknown option 'bogus' (known: path, ro, direct, queues, serial, size, "
                          "cache, ratio)"),
        ("d.img,ro=maybe", "--disk: option 'ro' wants on/off, not 'maybe'"),
        ("d.img,queues=four", "--disk: option 'queues' wants a number, not 'four'"),
        ("d.img,queues=", "--disk: option 'queues' wants a number, not ''"),
        ("d.img,size=1.5", "--disk: option 'size' wants a number, not '1.5'"),
        ("d.img,ratio=fast", "--disk: option 'ratio' wants a number, not 'fast'"),
        ("d.img,cache=always", "--disk: option 'cache' must be one of writeback, none, unsafe, not 'always'"),
        ("ro,direct", "--disk: missing option path"),
        ("a.img,b.img", "--disk: unknown option 'b.img' (known: path, ro, direct, queues, serial, size, "
                        "cache, ratio)"),
    ],
)
def test_option_string_errors(text, expected):
    with pytest.raises(UserError) as e:
        parse(text)
    assert one_line_error(e) == expected
    assert e.value.exit_status == 1


def test_error_from_the_dataclass_itself_names_the_device():
    with pytest.raises(UserError) as e:
        parse_option_string(Checked, "count=0", "--disk")
    assert one_line_error(e) == "--disk: count must be at least 1"


def test_choices_on_numbers():
    assert parse_option_string(NoRequired, "level=0x2", "--x").level == 2
    with pytest.raises(UserError, match=r"^--x: option 'level' must be one of 0, 1, 2, not 3$"):
        parse_option_string(NoRequired, "level=3", "--x")


def test_describe_options():
    assert describe_options(DiskConfig) == (
        "path=…,ro,direct,queues=…,serial=…,size=…,cache=writeback|none|unsafe,ratio=…"
    )


# ---- TOML tables -----------------------------------------------------------------------------------


def test_toml_tables_into_dataclasses(tmp_path):
    vm = tmp_path / "vm.toml"
    vm.write_text(
        'name = "test"\n'
        "[[disk]]\n"
        'path = "a.img"\n'
        "ro = true\n"
        "queues = 2\n"
        'cache = "none"\n'
        "size = 0x1000\n"
        "[[disk]]\n"
        'path = "b.img"\n'
        "ratio = 2\n"
    )
    doc = load_toml(str(vm))
    disks = [
        config_from_mapping(DiskConfig, t, f"{vm}: [[disk]] #{i + 1}") for i, t in enumerate(doc["disk"])
    ]
    assert disks == [
        DiskConfig(path="a.img", ro=True, queues=2, cache="none", size=4096),
        DiskConfig(path="b.img", ratio=2.0),
    ]


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"path": "a", "ro": "sometimes"}, "option 'ro' wants on/off, not 'sometimes'"),
        ({"path": "a", "queues": 1.5}, "option 'queues' wants a number, not 1.5"),
        ({"path": "a", "queues": True}, "option 'queues' wants a number, not True"),
        ({"path": "a", "ratio": True}, "option 'ratio' wants a number, not True"),
        ({"path": "a", "queues": "8"}, None),
        ({"path": ["a", "b"]}, "option 'path' wants a string, not ['a', 'b']"),
        ({"path": True}, "option 'path' wants a string, not True"),
        ({"path": "a", "serial": {"x": 1}}, "option 'serial' wants a string, not {'x': 1}"),
        ({"path": "a", "cache": "sometimes"}, "option 'cache' must be one of writeback, none, unsafe, "
                                              "not 'sometimes'"),
        ({"path": "a", "colour": "red"}, "unknown option 'colour' (known: path, ro, direct, queues, serial, "
                                         "size, cache, ratio)"),
        ({"ro": True}, "missing option path"),
    ],
)
def test_toml_table_errors(table, expected):
    what = "vm.toml: [[disk]] #1"
    if expected is None:
        assert config_from_mapping(DiskConfig, table, what).queues == 8
        return
    with pytest.raises(UserError) as e:
        config_from_mapping(DiskConfig, table, what)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"{what}: {expected}"


def test_load_toml_errors_are_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_toml(str(tmp_path / "missing.toml"))
    assert str(e.value) == f"{tmp_path / 'missing.toml'}: no such VM file"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[disk]\npath = 1\n")
    with pytest.raises(UserError) as e:
        load_toml(str(bad))
    assert str(e.value).startswith(f"{bad}: not valid TOML: ")
    assert "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"abcdeoprtuwqsz_-=,.0x19 ", "path", "ro", "cache", "none", "queues",
                                 "size", "ratio", "serial", "direct"]), max_size=30).map("".join))
def test_any_option_string_parses_or_is_one_user_error(text):
    try:
        cfg = parse_option_string(DiskConfig, text, "--disk", positional="path")
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith("--disk: ")
    else:
        assert isinstance(cfg, DiskConfig) and isinstance(cfg.path, str)


def test_load_toml_reads_only_regular_files(tmp_path):
    """Issue 20 items 10, 11: what is not a regular file is refused without reading (or blocking on) it."""
    import socket

    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        for path, kind in (("/dev/zero", "a character device"), (str(sock_path), "a socket"),
                           (str(tmp_path), "a directory")):
            with pytest.raises(UserError) as e:
                load_toml(path)
            assert str(e.value) == f"{path}: is {kind}, not a TOML file"


def test_load_toml_refuses_a_huge_file(tmp_path):
    from vdm.config import MAX_TOML_BYTES

    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * (MAX_TOML_BYTES // 10 + 1))
    with pytest.raises(UserError) as e:
        load_toml(str(big))
    assert str(e.value) == f"{big}: too large for a TOML file (more than {MAX_TOML_BYTES} bytes)"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", ["a" * 100_000, _nested(400)], ids=["long", "nested"])
def test_a_huge_wrong_value_makes_a_short_error_line(value):
    with pytest.raises(UserError) as e:
        config_from_mapping(DiskConfig, {"path": "d.img", "ro": value}, "[disk]")
    assert str(e.value).startswith("[disk]: option 'ro' wants on/off, not ")
    assert len(str(e.value)) < 160


@dataclass
class Fussy:
    size: int = 0

    def __post_init__(self):
        if self.size > 9:
            raise RuntimeError("too big for this device")


def test_any_exception_from_a_config_dataclass_is_one_user_error():
    with pytest.raises(UserError) as e:
        config_from_mapping(Fussy, {"size": 10}, "--fussy")
    assert str(e.value) == "--fussy: RuntimeError: too big for this device"
