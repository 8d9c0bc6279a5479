"""Third-party protocols and formats for vdm-blk: the ``vdm_blk_register_protocols`` hook.

vdm-blk owns this hookspec (the core knows no device): a distribution that adds an NBD-like
protocol or a disk format declares an entry point in the group ``vdm_blk.plugins`` naming a
module, and that module implements the hook with vdm-blk's marker::

    # pyproject.toml
    [project.entry-points."vdm_blk.plugins"]
    mydisk = "vdm_mydisk.blk"

    # vdm_mydisk/blk.py
    from vdm_blk.backends.extend import hookimpl

    @hookimpl
    def vdm_blk_register_protocols(register_protocol, register_format):
        register_protocol("mystore", open_mystore, ["mystore"], available=lambda: None)
        register_format("mine", open_mine, probe=lambda head: head[:4] == b"MINE")

The modules are loaded once, the first time a disk is opened or the catalog is listed. A module
that fails to load or whose hook raises is skipped with one log line; vdm-blk and the other
extensions keep working. The signatures of the two registration functions are those of
:func:`vdm_blk.backends.register_protocol` and :func:`vdm_blk.backends.register_format`.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

import pluggy

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "BlkSpec", "hookimpl", "hookspec", "load_extensions", "manager"]

log = logging.getLogger(__name__)

PROJECT = "vdm_blk"
ENTRY_POINT_GROUP = "vdm_blk.plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
#: marks an extension module's implementation of :meth:`BlkSpec.vdm_blk_register_protocols`
hookimpl = pluggy.HookimplMarker(PROJECT)


class BlkSpec:
    """The hooks vdm-blk calls in its extensions."""

    @hookspec
    def vdm_blk_register_protocols(
        self, register_protocol: Callable[..., None], register_format: Callable[..., None]
    ) -> None:
        """Add protocols (``register_protocol(name, opener, schemes, available)``) and formats
        (``register_format(name, opener, probe)``)."""


_lock = threading.Lock()
_pm: Optional[pluggy.PluginManager] = None
#: extension name -> None (loaded) or why it was skipped
_status: dict[str, Optional[str]] = {}
_loaded = False


def manager() -> pluggy.PluginManager:
    """vdm-blk's own plugin manager (hookspecs added); extensions are registered on it."""
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager(PROJECT)
        _pm.add_hookspecs(BlkSpec)
    return _pm


def register_extension(module: Any, name: str) -> Optional[str]:
    """Register one extension module and run its hook: None, or the one-line reason it failed."""
    from . import register_format, register_protocol

    pm = manager()
    try:
        pm.register(module, name=name)
    except Exception as e:
        return f"cannot register: {type(e).__name__}: {e}"
    for impl in pm.hook.vdm_blk_register_protocols.get_hookimpls():
        if impl.plugin is module:
            try:
                impl.function(register_protocol=register_protocol, register_format=register_format)
            except Exception as e:
                pm.unregister(module)
                return f"vdm_blk_register_protocols failed: {type(e).__name__}: {e}"
    return None


def load_extensions() -> dict[str, Optional[str]]:
    """Load the ``vdm_blk.plugins`` entry points once; their names and None or why skipped."""
    global _loaded
    with _lock:
        if _loaded:
            return dict(_status)
        _loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                module = ep.load()
            except Exception as e:
                why: Optional[str] = f"cannot import {ep.value}: {type(e).__name__}: {e}"
            else:
                why = register_extension(module, ep.name)
            if why is not None:
                log.warning("vdm-blk extension %s skipped: %s", ep.name, why)
            _status[ep.name] = why
        return dict(_status)
