"""Device configuration: option strings (``--disk disk.img,ro,cache=none``) and TOML tables.

A device type's configuration is a dataclass. Its fields are the options; their types say how a
value is parsed (``bool``, ``int`` -- decimal or 0x hex --, ``str``, ``Optional[...]`` of those) and
``field(metadata={"choices": (...), "help": "..."})`` limits and documents them. The same dataclass
is filled from a command-line string and from a TOML table, and a wrong option is one clear
:class:`~vdm.errors.UserError` line naming the option and what is accepted.

In an option string a comma inside a value is written twice, as in QEMU (``keys=a,,b``), or
escaped with a backslash (``keys=a\\,b``; ``\\\\`` is one backslash): :func:`split_options`
reads them and :func:`quote_option` writes them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import stat
import sys
import typing
from typing import Any, Mapping

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

__all__ = [
    "OPTION_SYNTAX_HELP",
    "config_class_problem",
    "config_from_mapping",
    "describe_options",
    "load_toml",
    "option_names",
    "parse_option_string",
    "quote_option",
    "split_options",
]

_TRUE = {"1", "on", "yes", "true", "y"}
#: values in error lines: a 100 kB string or a list nested 500 deep is shown in a few dozen characters
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2
_FALSE = {"0", "off", "no", "false", "n"}


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, _base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init}


def option_names(cls: type) -> frozenset[str]:
    """The option names a configuration dataclass takes (its fields set by ``__init__``)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init)


def config_class_problem(cls: Any) -> str | None:
    """Why ``cls`` cannot be a device type's configuration, or None when it can.

    It must be a dataclass (the class, not an instance) whose field annotations resolve: the
    option parser and ``--help`` read them. Checked when a plugin registers the device type, so a
    bad one fails that plugin instead of every command that lists device options.
    """
    if not isinstance(cls, type):
        return f"config must be a dataclass (the class), not {type(cls).__name__}"
    if not dataclasses.is_dataclass(cls):
        return f"config {cls.__name__} is not a dataclass (decorate it with @dataclass)"
    try:
        _fields(cls)
    except Exception as e:  # a NameError in a string annotation, a broken __class_getitem__, ...
        return f"config {cls.__name__}: its field types cannot be read ({type(e).__name__})"
    for name, (fld, _) in _fields(cls).items():
        choices = fld.metadata.get("choices")
        if choices is not None and not isinstance(choices, (tuple, list, set, frozenset)):
            return f"config {cls.__name__}: field {name}: choices must be a tuple of values"
    return None


def _convert(what: str, name: str, fld: dataclasses.Field, tp: Any, value: Any) -> Any:
    choices = fld.metadata.get("choices")
    try:
        if tp is bool:
            if isinstance(value, bool):
                out: Any = value
            elif str(value).lower() in _TRUE:
                out = True
            elif str(value).lower() in _FALSE:
                out = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, bool):
                raise ValueError
            out = value if isinstance(value, int) else int(str(value), 0)
        elif tp is float:
            if isinstance(value, bool):  # float(True) would quietly be 1.0
                raise ValueError
            out = float(value)
        else:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = str(value)
    except ValueError:
        kind = {bool: "on/off", int: "a number", float: "a number"}.get(tp, "a string")
        raise UserError(f"{what}: option '{name}' wants {kind}, not {_SHORT.repr(value)}") from None
    if choices and out not in choices:
        allowed = ", ".join(map(str, choices))
        raise UserError(f"{what}: option '{name}' must be one of {allowed}, not {_SHORT.repr(out)}")
    return out


def config_from_mapping(cls: type, values: Mapping[str, Any], what: str) -> Any:
    """Build a ``cls`` config from ``values`` (a TOML table or parsed options)."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UserError(f"{what}: unknown option '{key}' (known: {', '.join(fields)})")
        fld, tp = fields[name]
        kwargs[name] = _convert(what, key, fld, tp, value)
    missing = [
        n
        for n, (f, _) in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in kwargs
    ]
    if missing:
        raise UserError(f"{what}: missing option {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what}: {e}") from None
    except UserError:
        raise
    except Exception as e:  # a plugin's __post_init__ that raises something else: still one line
        raise UserError(f"{what}: {type(e).__name__}: {e}") from None


#: what ``--help`` says about writing option strings (commands put it in their epilog)
OPTION_SYNTAX_HELP = (
    "device options are VALUE,key=value,flag,...: a comma inside a value is written twice, as in "
    "QEMU (keys=a,,b is a,b), or as \\, (and a backslash as \\\\)"
)

#: what can be an option's name; a first item whose text before ``=`` is not one (a URI such as
#: ``nbd+unix:///?socket=/x.sock``) is the positional value, not ``key=value``
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _flag_names(cls: type | None) -> frozenset[str]:
    if cls is None:
        return frozenset()
    return frozenset(n for n, (_, tp) in _fields(cls).items() if tp is bool)


def split_options(text: str, cls: type | None = None) -> list[str]:
    """Split an option string at its commas; the items come back unescaped, empty ones kept.

    Inside a value a doubled comma is one comma, as in QEMU (``keys=a,,b`` -> ``keys=a,b``); a
    backslash escapes a comma or a backslash anywhere (``keys=a\\,b``, ``\\\\``) and any other
    backslash is kept as it is. A value is an item with ``=``, or a bare word that is not the name
    of one of ``cls``'s boolean options (after ``ro`` two commas are an empty item). Item ``N`` of
    the result is item ``N`` of the text, so positions (``positional``, ``"position": N``) hold.
    """
    flags = _flag_names(cls)
    items: list[str] = []
    buf: list[str] = []
    is_value = False  # an '=' was seen in this item
    i, end = 0, len(text)
    while i < end:
        c = text[i]
        if c == "\\" and i + 1 < end and text[i + 1] in ",\\":
            buf.append(text[i + 1])
            i += 2
            continue
        if c == ",":
            word = "".join(buf)
            doubled = i + 1 < end and text[i + 1] == ","
            if doubled and word and (is_value or word.replace("-", "_") not in flags):
                buf.append(",")
                i += 2
                continue
            items.append(word)
            buf, is_value = [], False
            i += 1
            continue
        if c == "=":
            is_value = True
        buf.append(c)
        i += 1
    items.append("".join(buf))
    return items


def quote_option(value: str) -> str:
    """``value`` escaped for an option string: :func:`split_options` gives it back unchanged."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def parse_option_string(cls: type, text: str, what: str, positional: str | None = None) -> Any:
    """Parse ``"disk.img,ro,cache=none"`` into a ``cls`` config.

    A bare word sets a boolean option; ``key=value`` sets any option; the first item, if it is not
    an option name, is the value of the ``positional`` field; item ``N`` (from 0), if it is not an
    option name, is the value of the field whose metadata has ``"position": N`` (kvmtool's
    ``--9p DIR,TAG``). Such a positional item may hold ``=`` when the text before it cannot be an
    option name (``nbd+unix:///?socket=/x.sock``). Commas inside values: :func:`split_options`.
    """
    fields = _fields(cls)
    at = {f.metadata.get("position"): n for n, (f, _) in fields.items() if f.metadata.get("position")}
    values: dict[str, Any] = {}
    for n, item in enumerate(split_options(text, cls)):
        if not item:
            continue
        key, sep, value = item.partition("=")
        name = key.replace("-", "_")
        slot = positional if n == 0 else at.get(n)
        if slot is not None and slot in values and n != 0:
            slot = None  # already given as key=value
        if sep and (name in fields or slot is None or _OPTION_NAME.match(key)):
            values[key] = value  # an unknown key is reported by config_from_mapping
        elif not sep and name in fields and fields[name][1] is bool:
            values[key] = True
        elif slot is not None:
            values[slot] = item
        else:
            raise UserError(f"{what}: unknown option '{item}' (known: {', '.join(fields)})")
    return config_from_mapping(cls, values, what)


def describe_options(cls: type) -> str:
    """A one-line summary of a config's options for --help."""
    parts = []
    for name, (fld, tp) in _fields(cls).items():
        choices = fld.metadata.get("choices")
        if tp is bool:
            parts.append(name)
        elif choices:
            parts.append(f"{name}={'|'.join(map(str, choices))}")
        else:
            parts.append(f"{name}=…")
    return ",".join(parts)


#: a VM or device file larger than this is refused (they are a few hundred bytes)
MAX_TOML_BYTES = 1 << 20

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _refuse_special(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise UserError(f"{path}: is {kind}, not a TOML file")


def _read_regular(path: str) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed).

    Stat'ed first, so that a device is never opened (opening some has effects) and a FIFO never
    blocks; then opened with O_NONBLOCK and checked again with ``fstat`` (the path may have been
    replaced in between).
    """
    try:
        _refuse_special(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"{path}: no such VM file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        _refuse_special(path, st)
        if st.st_size > MAX_TOML_BYTES:
            raise UserError(f"{path}: too large for a TOML file (more than {MAX_TOML_BYTES} bytes)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_TOML_BYTES + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOML_BYTES:
        raise UserError(f"{path}: too large for a TOML file (more than {MAX_TOML_BYTES} bytes)")
    return data


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML VM or device file; every problem with it is one clear :class:`UserError` line.

    Only a regular file is read (a directory, FIFO or device is refused without blocking); it must
    be UTF-8 text, valid TOML, and not nested deeper than the parser can follow.
    """
    data = _read_regular(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); TOML files are UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: not valid TOML here: arrays or tables nested too deeply") from None
