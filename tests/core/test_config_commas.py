"""Option strings whose values carry a comma (issue 19 item 11).

``--xyz keys=a\\,b`` used to end in ``unknown option 'b'``. A comma inside a value is written
doubled, as QEMU users know it (``keys=a,,b``), or escaped with a backslash (``keys=a\\,b``;
``\\\\`` is one backslash; any other backslash is kept as it is). A URI with ``=`` and ``?`` is
still a positional value (``--disk nbd+unix:///?socket=/x.sock``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vdm.config import parse_option_string, quote_option, split_options
from vdm.errors import UserError


@dataclass
class Disk:
    path: str
    ro: bool = False
    serial: Optional[str] = None
    keys: str = ""


@dataclass
class Share:
    """kvmtool's ``--9p DIR,TAG``: the tag is the second item."""

    path: str
    tag: str = field(default="share", metadata={"position": 1})
    ro: bool = False


@dataclass
class Flags:
    verbose: bool = False
    level: int = 0


def disk(text: str) -> Disk:
    return parse_option_string(Disk, text, "--disk", positional="path")


@pytest.mark.parametrize(
    "text, keys",
    [
        ("d.img,keys=a\\,b", "a,b"),  # the example
        ("d.img,keys=a,,b", "a,b"),  # QEMU's doubled comma
        ("d.img,keys=a,,b,,c,ro", "a,b,c"),
        ("d.img,keys=a,,,ro", "a,"),  # a doubled comma, then the separator
        ("d.img,keys=,,a", ",a"),
        ("d.img,keys=a\\\\,ro", "a\\"),  # an escaped backslash, then the separator
        ("d.img,keys=a\\b", "a\\b"),  # any other backslash is kept
        ("d.img,keys=C:\\x\\", "C:\\x\\"),
    ],
)
def test_a_value_can_carry_a_comma(text: str, keys: str) -> None:
    cfg = disk(text)
    assert cfg.keys == keys
    assert cfg.path == "d.img"
    assert cfg.ro is text.endswith(",ro")


def test_the_positional_value_can_carry_a_comma() -> None:
    assert disk("my,,disk.img,ro") == Disk(path="my,disk.img", ro=True)
    assert disk("my\\,disk.img") == Disk(path="my,disk.img")
    share = parse_option_string(Share, "/srv/a,,b,t,,1,ro", "--9p", positional="path")
    assert share == Share(path="/srv/a,b", tag="t,1", ro=True)


def test_a_uri_with_equals_and_question_mark_is_the_positional_value() -> None:
    assert disk("nbd+unix:///?socket=/x.sock") == Disk(path="nbd+unix:///?socket=/x.sock")
    assert disk("nbd+unix:///exp?socket=/x.sock,ro,serial=s1") == Disk(
        path="nbd+unix:///exp?socket=/x.sock", ro=True, serial="s1"
    )
    assert disk("nbd://host/exp?a=1,,b") == Disk(path="nbd://host/exp?a=1,b")
    assert disk("path=nbd+unix:///?socket=/x.sock,ro").path == "nbd+unix:///?socket=/x.sock"


@pytest.mark.parametrize("text, key", [("d.img,socket=/x.sock", "socket"), ("sise=10", "sise")])
def test_an_unknown_option_name_is_still_an_error(text: str, key: str) -> None:
    """Only a first item whose text before ``=`` cannot be an option name is a value."""
    with pytest.raises(UserError) as e:
        disk(text)
    assert str(e.value) == f"--disk: unknown option '{key}' (known: path, ro, serial, keys)"


def test_after_a_boolean_word_two_commas_are_an_empty_item() -> None:
    # a bare option name is not a value: nothing to escape, so ",," there stays an empty item
    assert parse_option_string(Flags, "verbose,,level=2", "--x") == Flags(verbose=True, level=2)
    assert disk("d.img,ro,,serial=s") == Disk(path="d.img", ro=True, serial="s")


def test_split_options_gives_the_items_unescaped() -> None:
    assert split_options("d.img,keys=a,,b,ro") == ["d.img", "keys=a,b", "ro"]
    assert split_options("a\\,b,c\\\\") == ["a,b", "c\\"]
    assert split_options("verbose,,level=2", Flags) == ["verbose", "", "level=2"]
    assert split_options("") == [""]


_values = st.text(alphabet=st.sampled_from([*"ab,=\\?/ :", "é"]), max_size=20)


@settings(max_examples=300, deadline=None)
@given(_values, _values)
def test_any_value_survives_quote_option(path: str, keys: str) -> None:
    """What a program writes with quote_option, the parser reads back exactly."""
    text = f"path={quote_option(path)},keys={quote_option(keys)},ro"
    assert disk(text) == Disk(path=path, keys=keys, ro=True)
    assert split_options(",".join(quote_option(v) for v in (path, keys))) == [path, keys]
