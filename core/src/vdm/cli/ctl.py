"""``vdm ctl``: talk to a running vdm's control socket (``--control PATH``; see :mod:`vdm.control`).

    vdm ctl --control /run/vdm.ctl list
    vdm ctl --control /run/vdm.ctl stats [--json]
    vdm ctl --control /run/vdm.ctl metrics          # Prometheus text format
    vdm ctl --control /run/vdm.ctl resize blk0 2G   # or without SIZE: re-read the image's size
    vdm ctl --control /run/vdm.ctl add -s /run/vdb.sock --disk /srv/b.img   # vdm vhost-user only
    vdm ctl --control /run/vdm.ctl remove blk1
    vdm ctl --control /run/vdm.ctl balloon balloon0 64M  # the balloon's size; without: show it

The path may come from ``$VDM_CONTROL`` instead. Exit status 0, or 1 with one line on stderr saying
what went wrong (no such socket, an error reply).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
from typing import Any

from ..errors import UserError
from ..registry import Command

_EXAMPLES = """

examples:
  vdm ctl --control /run/vdm.ctl list
  vdm ctl --control /run/vdm.ctl stats          # --json for every counter and the histogram
  vdm ctl --control /run/vdm.ctl metrics        # Prometheus text format
  vdm ctl --control /run/vdm.ctl resize blk0 2G # without SIZE: re-read the image's size
  vdm ctl --control /run/vdm.ctl balloon balloon0 64M  # ask the guest for 64M back (0: none)
  vdm ctl --control /run/vdm.ctl balloon balloon0      # target, actual, the guest's stats"""

__all__ = ["COMMAND", "add_parser", "parse_size", "request"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``1073741824``, ``512M``, ``2G``, ``1.5T`` (binary units, an optional trailing ``B``/``iB``)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = -1
    if value <= 0 or value != int(value):
        raise UserError(f"size {text!r}: a whole number of bytes greater than 0, e.g. 2G, 512M, 1073741824")
    return int(value)


def request(path: str, execute: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """One request on the control socket at ``path``; its ``return`` value, or a UserError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise UserError(f"ctl: cannot connect to {path}: {e.strerror} (is vdm running with --control?)")
        msg: dict[str, Any] = {"execute": execute, "id": 1}
        if arguments:
            msg["arguments"] = arguments
        sock.sendall(json.dumps(msg).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise UserError(f"ctl: {path}: {e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise UserError(f"ctl: {path}: no reply (closed the connection)") from None
    if "error" in reply:
        raise UserError(f"ctl: {execute}: {reply['error'].get('desc', reply['error'])}")
    return reply.get("return")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="PATH",
        default=os.environ.get("VDM_CONTROL"),
        help="the control socket of the running vdm (its --control; default: $VDM_CONTROL)",
    )
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    sub = p.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    sub.add_parser("list", help="devices: type, driver status, features, queues")
    sub.add_parser("stats", help="per-queue counters: requests, bytes, errors, in flight, latency")
    sub.add_parser("metrics", help="the counters in the Prometheus text format")
    r = sub.add_parser("resize", help="change a disk's size (none given: re-read its image's size)")
    r.add_argument("device", help="the device's id, as `vdm ctl list` shows it (blk0, blk1...)")
    r.add_argument("size", nargs="?", help="new size in bytes or with a unit (2G, 512M)")
    a = sub.add_parser(
        "add",
        prefix_chars="+",  # every word after `add` is the device's, options included
        add_help=False,
        help="vdm vhost-user: serve one more device (--socket-path PATH --disk IMG[,opts], "
        "as on its command line; relative paths are vdm's)",
    )
    a.add_argument("device_args", nargs="*", metavar="OPTIONS")
    d = sub.add_parser(
        "remove", help="vdm vhost-user: stop serving a device (frontend dropped, socket removed)"
    )
    d.add_argument("device", help="the device's id, as `vdm ctl list` shows it")
    b = sub.add_parser("balloon", help="set a balloon's size (what the guest gives back) or show it")
    b.add_argument("device", help="the balloon's id, as `vdm ctl list` shows it (balloon0...)")
    b.add_argument("size", nargs="?", help="the balloon's size in bytes or with a unit (64M); 0 empties it")


def _latency(buckets: list[list[int]]) -> str:
    total = sum(n for _, n in buckets)
    if not total:
        return "-"
    seen = 0
    for upper, n in buckets:  # the median's bucket
        seen += n
        if seen * 2 >= total:
            return f"p50<{_ns(upper)}"
    return "-"  # pragma: no cover


def _ns(ns: int) -> str:
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


def _print_list(ret: dict[str, Any]) -> None:
    for d in ret["devices"]:
        status = ",".join(d.get("status_names", [])) or "-"
        state = "running" if d.get("running") else "stopped"
        queues = d.get("queues", [])
        ready = sum(1 for q in queues if q["ready"])
        feats = d.get("driver_features", "-")
        extra = f" broken: {d['broken']}" if d.get("broken") else ""
        print(
            f"{d['id']:<8} {d['type']:<8} {state:<8} status={status} features={feats} "
            f"queues={ready}/{len(queues)} ready{extra}"
        )


def _print_stats(ret: dict[str, Any]) -> None:
    print(
        f"{'DEVICE':<8} {'Q':>2} {'REQUESTS':>10} {'READ':>14} {'WRITTEN':>14} {'ERR':>5} {'INFL':>4} LATENCY"
    )
    for d in ret["devices"]:
        for q in d["queues"]:
            print(
                f"{d['id']:<8} {q['index']:>2} {q['requests']:>10} {q['bytes_read']:>14} "
                f"{q['bytes_written']:>14} {q['errors']:>5} {q['in_flight']:>4} {_latency(q['latency_ns'])}"
            )


def _print_fields(ret: dict[str, Any]) -> None:
    """A device command's reply: one ``key: value`` line each, a dict's members indented."""
    for key, value in ret.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def _run(args: argparse.Namespace) -> int:
    if not args.control:
        raise UserError("ctl: give --control PATH (the --control of the running vdm) or set $VDM_CONTROL")
    cmd = args.ctl_command
    arguments: dict[str, Any] = {}
    if cmd == "resize":
        arguments = {"device": args.device, "size": parse_size(args.size) if args.size else None}
    elif cmd == "balloon":
        size = None
        if args.size is not None:
            size = 0 if args.size.strip().upper().rstrip("KMGTIB") in ("0", "0.0") else parse_size(args.size)
        arguments = {"device": args.device, "size": size}
    elif cmd == "add":
        if not args.device_args:
            raise UserError(
                "ctl add: give the device as on vdm vhost-user's command line: -s PATH --disk IMG"
            )
        arguments = {"argv": args.device_args}
    elif cmd == "remove":
        arguments = {"device": args.device}
    ret = request(args.control, cmd, arguments)
    if args.json:
        json.dump(ret, sys.stdout, indent=2)
        print()
    elif cmd == "list":
        _print_list(ret)
    elif cmd == "stats":
        _print_stats(ret)
    elif cmd == "metrics":
        sys.stdout.write(ret["text"])
    elif cmd == "balloon":
        _print_fields(ret)
    elif cmd == "add":
        print(f"{ret['device']}: serving on {ret['socket']}")
    elif cmd == "remove":
        print(f"{ret['device']}: removed ({ret['socket']} closed)")
    else:
        print(f"{ret['device']}: {ret['size']} bytes")
    return 0


COMMAND = Command(
    name="ctl",
    help="talk to a running vdm's control socket (list, stats, metrics, resize, balloon)",
    add_arguments=_add_arguments,
    run=_run,
)


def add_parser(sub: Any) -> None:
    """Add ``ctl`` to ``vdm``'s subcommands (dispatched like a plugin's command)."""
    p = sub.add_parser(COMMAND.name, help=COMMAND.help, description=COMMAND.help + _EXAMPLES)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(_command=COMMAND, _unavailable=None, _provider="vdm-core")
    # its eight parsers are made when ctl is used (parsed, or its help shown), not at every vdm start
    p.add_options_later(functools.partial(COMMAND.add_arguments, p))
