"""Device options on a command line, from what the plugins registered.

Every :class:`~vdm.registry.DeviceType` with a ``cli_flag`` becomes one repeatable option
(``-d/--disk PATH[,ro]...``, ``-n/--network mode=tap,...``); a TOML file's tables named by the
types' ``toml_key`` (``[[disk]]``, ``[network]``) give the same configurations. Commands that
take devices (``vdm run``, ``vdm vhost-user``) share this::

    add_device_options(parser, plugins)
    ...
    for dtype, config in device_configs(args, plugins, load_toml(path), base_dir=...):
        devices.append(create_device(dtype, config, DeviceContext(...)))
    ...
    close_devices(devices)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Iterable, Mapping

from ..config import config_from_mapping, describe_options, parse_option_string
from ..errors import UserError
from ..plugins import PluginSet
from ..registry import DeviceContext, DeviceType

__all__ = [
    "DEST_PREFIX",
    "add_device_options",
    "close_devices",
    "create_device",
    "device_configs",
    "devices_epilog",
]

log = logging.getLogger(__name__)

#: argparse destination of a device type's option: ``dev_<name>``
DEST_PREFIX = "dev_"


def _types(plugins: PluginSet) -> list[tuple[DeviceType, Any]]:
    return sorted(plugins.devices.values(), key=lambda x: x[0].name)


def add_device_options(parser: argparse.ArgumentParser, plugins: PluginSet | None) -> None:
    """Add one repeatable option per device type that has a ``cli_flag``.

    Options already on the parser are not added twice (a device type whose flag clashes with the
    command's own option, or with a device type whose name sorts first, is left out of that
    command). Each option's help names the plugin's distribution and the accepted option keys. A
    device type whose option cannot be added is left out with one warning line; the command and
    the other device types keep working.
    """
    if plugins is None:
        return
    group = parser.add_argument_group("devices (from the installed plugins)")
    for dt, info in _types(plugins):
        if not dt.cli_flag:
            continue
        taken = parser._option_string_actions
        flags = [f for f in (dt.cli_short, dt.cli_flag) if f and f not in taken]
        if dt.cli_flag not in flags:
            continue
        why = plugins.check(dt.check)
        note = f" (unavailable here: {why})" if why else ""
        text = f"{dt.help} [{info.distribution}]{note}; options: {describe_options(dt.config)}"
        try:
            group.add_argument(
                *flags,
                dest=f"{DEST_PREFIX}{dt.name}",
                action="append",
                metavar="OPTIONS",
                help=text.replace("%", "%%"),  # argparse %-formats help: a plugin's "50%" is text
            )
        except Exception as e:  # an option argparse refuses: that device type is left out
            print(f"vdm: warning: device type {dt.name} [{info.distribution}] left out: {e}", file=sys.stderr)


def devices_epilog(plugins: PluginSet | None) -> str:
    """A paragraph for --help listing every device type the plugins provide."""
    if plugins is None or not plugins.devices:
        return "No device plugins are installed."
    lines = ["device types provided by plugins:"]
    for dt, info in _types(plugins):
        how = ", ".join(x for x in (dt.cli_flag, f"[{dt.toml_key}]" if dt.toml_key else None) if x)
        lines.append(f"  {dt.name:10} {how or '(no option)'}  {dt.help} [{info.distribution}]")
    return "\n".join(lines)


def _resolve_paths(table: Mapping[str, Any], base_dir: str | None) -> dict[str, Any]:
    out = dict(table)
    path = out.get("path")
    if base_dir and isinstance(path, str):
        out["path"] = os.path.join(base_dir, os.path.expanduser(path))
    return out


def _is_table(value: Any) -> bool:
    """A TOML table (``[x]``) or array of tables (``[[x]]``), as opposed to a plain value."""
    if isinstance(value, Mapping):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _unknown_tables(doc: Mapping[str, Any], plugins: PluginSet, *, strict: bool) -> None:
    """Tables no loaded device type reads: a warning on stderr, a :class:`UserError` if ``strict``.

    A misspelt ``[[diks]]``, or the tables of a plugin that failed to load, would otherwise be
    dropped without a word and the VM started without that device.
    """
    known = sorted({dt.toml_key for dt, _ in _types(plugins) if dt.toml_key})
    names = ", ".join(f"[{k}]" for k in known) or "none"
    for key in sorted(k for k, v in doc.items() if _is_table(v) and k not in known):
        why = f"[{key}]: unknown table (no loaded plugin reads it; device tables: {names})"
        if strict:
            raise UserError(f"{why}; remove it or install the plugin that reads it")
        print(f"vdm: warning: {why}; ignored", file=sys.stderr)


def device_configs(
    args: argparse.Namespace,
    plugins: PluginSet,
    doc: Mapping[str, Any] | None = None,
    *,
    base_dir: str | None = None,
) -> list[tuple[DeviceType, Any]]:
    """The devices asked for: ``(DeviceType, config)`` pairs, TOML tables first, by type name.

    For each type the command line's options replace the TOML file's tables of that type. A
    table's relative ``path`` is taken relative to ``base_dir`` (the TOML file's folder). A wrong
    option, an unknown key, or a type that is unavailable here is a :class:`UserError`; a table
    that no loaded device type reads is a warning (an error under ``--strict``).
    """
    doc = doc or {}
    _unknown_tables(doc, plugins, strict=bool(getattr(args, "strict", False)))
    out: list[tuple[DeviceType, Any]] = []
    for dt, _ in _types(plugins):
        cli = getattr(args, f"{DEST_PREFIX}{dt.name}", None) or []
        tables: Any = doc.get(dt.toml_key, []) if dt.toml_key else []
        if isinstance(tables, Mapping):
            tables = [tables]
        if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
            raise UserError(f"[{dt.toml_key}] must be a table or an array of tables")
        if cli:
            tables = []
        found = [
            (dt, config_from_mapping(dt.config, _resolve_paths(t, base_dir), f"[{dt.toml_key}]"))
            for t in tables
        ]
        found += [
            (dt, parse_option_string(dt.config, text, dt.cli_flag or dt.name, dt.positional)) for text in cli
        ]
        if found:
            why = plugins.check(dt.check)
            if why:
                raise UserError(f"{dt.cli_flag or dt.name}: device type {dt.name} is unavailable here: {why}")
        out += found
    return out


def create_device(dtype: DeviceType, config: Any, ctx: DeviceContext) -> Any:
    """``dtype.create(config, ctx)``, with a backend's own error (a disk it cannot open, a tap
    that does not exist) turned into one :class:`UserError` line naming the option."""
    try:
        return dtype.create(config, ctx)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{dtype.cli_flag or dtype.name}: {e}") from None


def close_devices(devices: Iterable[Any]) -> None:
    """Close every device that has a ``close()``; one that fails is logged, the rest still close."""
    for dev in devices:
        close = getattr(dev, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception:
            log.exception("closing %r", dev)
