"""``vdm list-plugins``: what is installed, what is usable here, and why not.

KIND says what a plugin provides: ``device``, ``hypervisor`` (VMs driven through the VMM hooks),
``server`` (a way of serving devices that is no hypervisor: vhost-user) or ``command``. The
``--json`` form adds, per plugin, what it provides by kind, the availability of each name, its
hooks, the optional parts of its device types and whether each is usable (vdm-blk's protocols and
formats, and whether its compiled serve step is active), its ``VDM_API`` and what it uses that is
deprecated (each naming the replacement); at the top, ``fastpath``: which virtqueue path is active
(:data:`vdm.fastpath.STATUS`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..fastpath import STATUS as FASTPATH
from ..plugins import PluginSet

__all__ = ["add_parser", "as_records", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list-plugins", help="show installed plugins, whether each is usable, and why not")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(_list_plugins=True)


def as_records(plugins: PluginSet) -> list[dict[str, Any]]:
    """The listing as plain data (the --json output)."""
    return [
        {
            "name": p.name,
            "distribution": p.distribution,
            "version": p.version,
            "kind": "/".join(p.kinds) or "-",
            "status": p.status,
            "provides": {
                "devices": p.devices,
                "hypervisors": p.hypervisors,
                "servers": p.servers,
                "commands": p.commands,
            },
            "availability": {
                k: ("available" if v is None else f"unavailable: {v}") for k, v in p.availability.items()
            },
            "parts": {
                device: {
                    group: {n: ("available" if r is None else f"unavailable: {r}") for n, r in names.items()}
                    for group, names in groups.items()
                }
                for device, groups in p.parts.items()
            },
            "parts_errors": p.parts_errors,
            "hooks": p.hooks,
            "api": p.api,
            "deprecations": p.deprecations,
            "module": p.module,
            "path": p.path,
        }
        for p in plugins.plugins
    ]


def run(args: argparse.Namespace, plugins: PluginSet) -> int:
    records = as_records(plugins)
    if args.json:
        out = {"plugins": records, "conflicts": plugins.conflicts, "fastpath": FASTPATH}
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if not records:
        print("no vdm plugins installed (install e.g. vdm-blk, vdm-kvm)")
        return 0
    cols = ("name", "distribution", "version", "kind", "status")
    rows = [[str(r[c]) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for c in plugins.conflicts:
        print(f"conflict: {c}")
    return 0
