"""vdm-blk's plugin module: registers the ``blk`` device type (``--disk``, ``[[disk]]``)."""

from __future__ import annotations

from typing import Any, Callable

from vdm import hookimpl
from vdm.registry import DeviceContext, DeviceType

from .config import BlkConfig

VDM_API = 2


def create(config: BlkConfig, ctx: DeviceContext):  # -> BlkDevice (imported lazily: list-plugins stays fast)
    from contextlib import nullcontext

    from .backends import open_disk
    from .backends.locking import locks_deferred
    from .device import BlkDevice

    allowed = tuple(p for p in (config.allow_backing or "").split(":") if p)
    with locks_deferred() if config.lock == "start" else nullcontext() as deferred:
        backend = open_disk(
            config.path,
            read_only=config.ro,
            direct=config.direct or config.cache == "none",
            format=config.format,
            allowed_backing=allowed,
            options={
                "reconnect_timeout": config.reconnect_timeout,
                "request_timeout": config.request_timeout,
                "connections": config.connections,
            },
        )
    return BlkDevice(backend, config, deferred_locks=deferred)


def parts() -> dict[str, dict[str, Any]]:
    """The protocols and formats installed here and whether each is usable, and whether raw
    and qcow2 images are served by the compiled serve step (issue 18) or by the Python path alone, with
    why (for list-plugins)."""
    from . import fastserve
    from .backends import catalog

    return {**catalog(), "fast path": {"compiled serve step": None if fastserve.ACTIVE else fastserve.STATUS}}


def toolstack_disk_options(params: str, writable: bool) -> dict[str, Any]:
    """A toolstack's disk (Xen's xenstore ``params`` and mode) as ``--disk`` options."""
    return {"path": params, "ro": not writable}


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="blk",
            config=BlkConfig,
            create=create,
            cli_flag="--disk",
            cli_short="-d",
            positional="path",
            toml_key="disk",
            help="virtio-blk disk: raw file, block device or qcow2 image",
            virtio_id=2,
            from_toolstack_disk=toolstack_disk_options,
            parts=parts,
        )
    )
