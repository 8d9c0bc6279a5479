"""``vdm``: load plugins, build the command line from what they provide, run a subcommand."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from typing import Sequence

from .. import __version__
from ..errors import UserError
from ..plugins import PluginSet, _check, load_plugins
from . import list_plugins, new_plugin

__all__ = ["build_parser", "main"]

log = logging.getLogger("vdm")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"vdm {__version__}")
    parser.add_argument(
        "--plugins",
        metavar="NAMES",
        help="load only these plugins (comma list; default: $VDM_PLUGINS or all)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with an error if any plugin fails to load"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")


def build_parser(plugins: PluginSet) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdm", description="virtio devices for KVM, Xen and vhost-user frontends"
    )
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    list_plugins.add_parser(sub)
    new_plugin.add_parser(sub)
    for name, (cmd, info) in sorted(plugins.commands.items()):
        if name in sub.choices:  # argparse would raise: a plugin cannot replace a built-in command
            plugins.conflicts.append(f"command '{name}' of {info.distribution} ignored: vdm has its own")
            continue
        why = _check(cmd.available)  # a check that raises is a reason, not a crash
        kw = {"help": f"{cmd.help} [{info.distribution}]"} if why is None else {}
        p = sub.add_parser(name, description=cmd.help, **kw)
        p.set_defaults(_command=cmd, _unavailable=why, _provider=info.distribution)
        if why is None:
            p.vdm_plugins = plugins  # type: ignore[attr-defined]  # for options per device type
            try:
                cmd.add_arguments(p)
            except Exception as e:
                why = f"its options are broken ({type(e).__name__}: {e})"
                p.set_defaults(_unavailable=why)
        if why is not None:
            p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # kill -USR1 <pid>: every thread's Python stack on stderr, for reports of a stuck vdm
    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (embedded)
            pass
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    early, _ = pre.parse_known_args(argv)
    level = logging.WARNING - 10 * min(early.verbose, 2)
    logging.basicConfig(level=level, format="vdm: %(name)s: %(message)s")
    only = [n.strip() for n in early.plugins.split(",") if n.strip()] if early.plugins else None
    plugins = load_plugins(only=only)
    parser = build_parser(plugins)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_unavailable", None):
        parser.parse_args(argv)  # an unavailable command ignores its options; others report them
    for p in plugins.errors if not getattr(args, "_list_plugins", False) else []:
        print(f"vdm: plugin {p.name} ({p.distribution} {p.version}) {p.status}", file=sys.stderr)
    if args.strict and plugins.errors and not getattr(args, "_list_plugins", False):
        return 1
    args.plugin_set = plugins
    try:
        if getattr(args, "_list_plugins", False):
            # with --strict, still list (it is how one finds the broken plugin), then fail
            status = list_plugins.run(args, plugins)
            return 1 if args.strict and plugins.errors else status
        cmd = getattr(args, "_command", None)
        if cmd is None:
            parser.print_help()
            return 0
        if args._unavailable:
            print(
                f"vdm: {args.command} is provided by {args._provider}, which is unavailable here: "
                f"{args._unavailable}",
                file=sys.stderr,
            )
            return 1
        return int(cmd.run(args) or 0)
    except UserError as e:
        print(f"vdm: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
