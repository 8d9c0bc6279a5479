"""What the control socket reports about devices, and what a device implements to be controlled.

:mod:`vdm.control` serves the socket; this module turns devices into plain data: ``list``
(:func:`device_list`), ``stats`` (:func:`device_stats`, the counters of
:class:`~vdm.virtqueue.Virtqueue`) and ``metrics`` (:func:`metrics_text`, the Prometheus text
exposition format 0.0.4, written here: no library needed). A device takes part through
:class:`Resizable` (``resize``) and :class:`Controllable` (commands of its own). Counters are read
without locks: a report may be a few requests behind, never inconsistent enough to go backwards.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

__all__ = [
    "Controllable",
    "Resizable",
    "device_commands",
    "device_list",
    "device_stats",
    "metrics_text",
    "queue_stats",
]

log = logging.getLogger(__name__)

_STATUS_BITS = ((1, "ACKNOWLEDGE"), (2, "DRIVER"), (4, "DRIVER_OK"), (8, "FEATURES_OK"),
                (64, "DEVICE_NEEDS_RESET"), (128, "FAILED"))  # fmt: skip


@runtime_checkable
class Resizable(Protocol):
    """A device whose capacity ``vdm ctl resize`` changes (vdm-blk's)."""

    def resize(self, size: int | None) -> int:
        """Set the capacity to ``size`` bytes (None: re-read the backend's size), tell the driver
        (a config-change notification); return the new size. Raise ValueError with a reason."""
        ...


@runtime_checkable
class Controllable(Protocol):
    """A device that offers its own control commands (vdm-balloon's ``balloon``).

    ``control_commands()`` returns ``{command name: callable}``; the control socket calls
    ``callable(arguments)`` (the request's arguments without ``device``) on its own thread and
    replies with what it returns (JSON-serialisable; a dict gets ``device`` added). The callable
    raises ValueError (or OSError) with a reason for a bad request: an error reply, the client
    stays. A name the core already has (``list``, ``stats``, ``metrics``, ``resize``) is never
    dispatched to a device.
    """

    def control_commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]: ...


def device_commands(dev: Any, reserved: Iterable[str] = ()) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """A device's control commands but ``reserved`` (the core's own); {} for a device without them or
    whose method misbehaves."""
    if not isinstance(dev, Controllable):
        return {}
    try:
        commands = dev.control_commands()
    except Exception:  # a device's bug must not cost the control socket
        log.exception("control: %s: control_commands() failed", getattr(dev, "name", dev))
        return {}
    if not isinstance(commands, dict):
        return {}
    return {k: v for k, v in commands.items() if isinstance(k, str) and callable(v) and k not in reserved}


def _status_names(status: int) -> list[str]:
    return [name for b, name in _STATUS_BITS if status & b]


def device_list(entries: list[tuple[str, str, Any]], reserved: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``list``: one record per ``(id, type name, device)``; a device's own commands but ``reserved``."""
    out = []
    for ident, kind, dev in entries:
        queues = getattr(dev, "queues", None) or []
        status = int(getattr(dev, "status", 0))
        rec: dict[str, Any] = {"id": ident, "type": kind, "name": getattr(dev, "name", kind)}
        if queues:
            rec.update(
                running=bool(getattr(dev, "activated", False)),
                status=status,
                status_names=_status_names(status),
                driver_features=f"{int(getattr(dev, 'driver_features', 0)):#x}",
                broken=getattr(dev, "broken", None),
                queues=[
                    {"index": q.index, "size": q.size, "ready": q.ready, "active": q.active} for q in queues
                ],
            )
        if isinstance(dev, Resizable):
            rec["resizable"] = True
        commands = device_commands(dev, reserved)
        if commands:
            rec["commands"] = sorted(commands)
        out.append(rec)
    return out


def queue_stats(q: Any) -> dict[str, Any]:
    """One queue's counters (see :mod:`vdm.virtqueue`); latency as ``[upper bound ns, count]``."""
    latency = list(q.latency)
    return {
        "index": q.index,
        "requests": q.requests,
        "completed": sum(latency),
        "bytes_read": q.bytes_read,
        "bytes_written": q.bytes_written,
        "errors": q.errors,
        "in_flight": q.in_flight,
        "latency_sum_ns": q.latency_sum_ns,
        "latency_ns": [[1 << i, n] for i, n in enumerate(latency) if n],
    }


def device_stats(entries: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    """``stats``: every queue's counters, per device."""
    return [
        {"id": ident, "type": kind, "queues": [queue_stats(q) for q in getattr(dev, "queues", None) or []]}
        for ident, kind, dev in entries
    ]


_COUNTERS = (
    ("requests", "vdm_queue_requests_total", "Chains taken from the available ring."),
    ("completed", "vdm_queue_completed_total", "Chains returned through the used ring."),
    ("bytes_read", "vdm_queue_read_bytes_total", "Bytes in device-readable buffers of the chains taken."),
    ("bytes_written", "vdm_queue_written_bytes_total", "Bytes the device reported written."),
    ("errors", "vdm_queue_errors_total", "Guest errors and requests the device failed."),
)
#: histogram buckets exported: 1 us .. 2**35 ns (34 s), powers of two
_BUCKETS = range(10, 36)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(stats: list[dict[str, Any]]) -> str:
    """``metrics``: the ``stats`` records in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    rows = [
        (f'device="{_esc(d["id"])}",type="{_esc(d["type"])}",queue="{q["index"]}"', q)
        for d in stats
        for q in d["queues"]
    ]
    for key, name, text in _COUNTERS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [f"{name}{{{labels}}} {q[key]}" for labels, q in rows]
    lines += ["# HELP vdm_queue_in_flight Requests the device holds now.", "# TYPE vdm_queue_in_flight gauge"]
    lines += [f"vdm_queue_in_flight{{{labels}}} {q['in_flight']}" for labels, q in rows]
    name = "vdm_queue_latency_seconds"
    lines += [f"# HELP {name} Time from taking a chain to completing it.", f"# TYPE {name} histogram"]
    for labels, q in rows:
        counts = dict((b.bit_length() - 1, n) for b, n in q["latency_ns"])
        below = 0
        for i in range(0, _BUCKETS.start):
            below += counts.get(i, 0)
        for i in _BUCKETS:
            below += counts.get(i, 0)
            lines.append(f'{name}_bucket{{{labels},le="{(1 << i) / 1e9!r}"}} {below}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {q["completed"]}')
        lines.append(f"{name}_sum{{{labels}}} {q['latency_sum_ns'] / 1e9:.9g}")
        lines.append(f"{name}_count{{{labels}}} {q['completed']}")
    return "\n".join(lines) + "\n"
