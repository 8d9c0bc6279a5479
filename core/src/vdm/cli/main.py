"""``vdm``: load plugins, build the command line from what they provide, run a subcommand.

A plugin command's parser has the loaded :class:`~vdm.plugins.PluginSet` as its default
``plugin_set`` (``parser.get_default("plugin_set")`` in ``add_arguments``, ``args.plugin_set`` in
``run``). A command whose ``available`` check gives a reason still gets its options, so that
``vdm COMMAND --help`` shows them with the reason; ``vdm --help`` lists it as unavailable, and
invoking it prints the reason (exit 1) whatever its arguments are.

Start-up: a command's availability check and options (``available`` and ``add_arguments``: plugin
code, which may import or dlopen a lot -- vdm-xen's ``dm-only`` ~30 ms here, seconds in the KVM lab)
are asked only for the command named on the command line, while plugin output goes to stderr (for
``vdm --help``: every check, no options); any other command's parser asks them when it is first
used (parsed or its help shown), so what every parser accepts and shows is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

from .. import __version__
from ..errors import UserError
from ..fastpath import STATUS as FASTPATH
from ..plugins import PluginSet, load_plugins, timeout_from_env
from . import ctl, list_plugins, new_plugin

__all__ = ["build_parser", "main"]

log = logging.getLogger("vdm")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"vdm {__version__} (fastpath: {FASTPATH})")
    parser.add_argument(
        "--plugins",
        metavar="NAMES",
        help="load only these plugins (comma list; default: $VDM_PLUGINS or all)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with an error if any plugin fails to load, a --plugins name is unknown, "
        "or a TOML file has a table no plugin reads",
    )
    parser.add_argument(
        "--plugin-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long a plugin may take to import or answer a check before it is reported as "
        "not answering (default: $VDM_PLUGIN_TIMEOUT or 10)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds greater than 0")
    return value


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While plugin code runs, what it prints (``print`` or a write to fd 1) goes to stderr.

    vdm's own output (``list-plugins --json``, ``--help``) is written afterwards and stays clean.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 or 2 (embedded): the Python-level redirect still applies
        saved = -1
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)


class _Unavailable(Exception):
    """A command that cannot run here was given arguments its parser (``args[0]``) refuses."""


class CommandParser(argparse.ArgumentParser):
    """The parser of one ``vdm`` subcommand.

    :attr:`unavailable` is the reason the command cannot run here (None when it can); then a
    parse error is not reported (the reason is, by :func:`main`). Options given to
    :meth:`add_options_later` are added by :meth:`complete`, at the latest when the parser first
    parses or formats its help or usage.
    """

    unavailable: Optional[str] = None
    _pending: Optional[Callable[[], None]] = None

    def add_options_later(self, fn: Callable[[], None]) -> None:
        self._pending = fn

    def complete(self) -> None:
        """Add the options given to :meth:`add_options_later`, once."""
        fn, self._pending = self._pending, None
        if fn is not None:
            fn()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

    @property
    def vdm_plugins(self) -> Any:
        """Deprecated (plugin API 1): use ``parser.get_default("plugin_set")``."""
        warnings.warn(
            "parser.vdm_plugins is deprecated (plugin API 2): use parser.get_default('plugin_set')",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.get_default("plugin_set")

    def error(self, message: str) -> NoReturn:
        if self.unavailable is not None:
            raise _Unavailable(self, message)
        super().error(message)


def _add_options(p: CommandParser, cmd: Any, why: Optional[str], plugins: PluginSet, check: bool) -> None:
    """A plugin command's options (time-bounded plugin code); broken ones make it unavailable.
    ``check``: ask its availability first (it was not asked when its parser was made)."""
    if check:
        why = plugins.check(cmd.available)
        if why is not None:
            p.unavailable = why
            p.set_defaults(_unavailable=why)
            p.description = f"{cmd.help}\n\nUnavailable here: {why}".replace("%", "%%")
    _, broken = plugins.call(functools.partial(cmd.add_arguments, p))  # bounded, any exception
    if broken is not None:
        # a command that cannot run here anyway keeps that reason (its options may need what is missing)
        why = why if why is not None else f"its options are broken ({broken})"
        p.unavailable = why
        p.set_defaults(_unavailable=why)
        p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    if why is not None and p.epilog and "Unavailable here" not in p.epilog:
        p.epilog += f"\n\nUnavailable here: {why}"  # the command's own epilog may be long


#: :func:`build_parser`'s default: every plugin command's check and options now
ALL = "*"


def build_parser(plugins: PluginSet, command: Optional[str] = ALL) -> argparse.ArgumentParser:
    """The ``vdm`` parser.

    ``command``: :data:`ALL` asks every plugin command's availability check and adds its options
    now; a command's name does so for that command only (the others ask both when their parser is
    first used, see :class:`CommandParser`; their ``vdm --help`` line is then not marked
    unavailable, and that help is shown only when no command is named); None (no command named:
    ``vdm --help``) asks every check, for the help lines, and adds no options yet.
    """
    parser = argparse.ArgumentParser(
        prog="vdm", description="virtio devices for KVM, Xen and vhost-user frontends"
    )
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    list_plugins.add_parser(sub)
    new_plugin.add_parser(sub)
    ctl.add_parser(sub)
    for name, (cmd, info) in sorted(plugins.commands.items()):
        if name in sub.choices:  # argparse would raise: a plugin cannot replace a built-in command
            plugins.conflicts.append(f"command '{name}' of {info.distribution} ignored: vdm has its own")
            continue
        check_now = command in (ALL, None, name)
        # a check that raises or hangs is a reason, not a crash
        why = plugins.check(cmd.available) if check_now else None
        # argparse %-formats help: a plugin's "50% faster" is text, not a format
        line = f"{cmd.help} [{info.distribution}]" if why is None else f"(unavailable here) {cmd.help}"
        description = cmd.help if why is None else f"{cmd.help}\n\nUnavailable here: {why}"
        p = sub.add_parser(name, description=description.replace("%", "%%"), help=line.replace("%", "%%"))
        assert isinstance(p, CommandParser)
        p.unavailable = why
        p.set_defaults(_command=cmd, _unavailable=why, _provider=info.distribution, plugin_set=plugins)
        p.add_options_later(functools.partial(_add_options, p, cmd, why, plugins, not check_now))
        if command in (ALL, name):
            p.complete()
    return parser


def _unavailable_command(command: CommandParser, argv: Sequence[str]) -> argparse.Namespace:
    """The namespace of an unavailable command whose arguments did not parse: what ``main`` needs
    to say why it cannot run (the global options are parsed, the command's are ignored)."""
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    args, _ = pre.parse_known_args(argv)
    args.command = command.prog.split()[-1]  # "vdm run"
    for key in ("_command", "_unavailable", "_provider", "plugin_set"):
        setattr(args, key, command.get_default(key))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while plugins load or a command runs
        return 130


def _dump_stacks(signum: int, frame: object) -> None:
    """SIGUSR1: print every thread's Python stack (faulthandler's layout) and carry on.

    A Python-level handler, not ``faulthandler.register(all_threads=True)``: faulthandler walks the
    other threads' frames from inside the C signal handler while those threads run, and under
    traffic that crashed vdm in libpython (16-33 signals, tests/vhost_user/test_dpdk_net.py). Here
    the handler runs in the main thread between bytecodes, holding the GIL, so every other thread
    is parked at a consistent point. The main thread must therefore come back to Python now and then
    (every command waits in slices or on a wakeup fd for that reason).
    """
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out = []
    for ident, top in sys._current_frames().items():
        head = "Current thread" if ident == me else "Thread"
        out.append(f"{head} 0x{ident:016x} ({names.get(ident, '?')}) (most recent call first):")
        f = top
        while f is not None:
            out.append(f'  File "{f.f_code.co_filename}", line {f.f_lineno} in {f.f_code.co_name}')
            f = f.f_back
        out.append("")
    try:
        sys.stderr.write("\n".join(out) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing to say it on
        pass


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # kill -USR1 <pid>: every thread's Python stack on stderr, for reports of a stuck vdm
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _dump_stacks)
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    early, rest = pre.parse_known_args(argv)
    # the command, if one is given (``vdm -h run`` shows vdm's help: no command named)
    named = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)
    command = None if named is None or {"-h", "--help"} & set(rest[:named]) else rest[named]
    level = logging.WARNING - 10 * min(early.verbose, 2)
    logging.basicConfig(level=level, format="vdm: %(name)s: %(message)s")
    only = [n.strip() for n in early.plugins.split(",") if n.strip()] if early.plugins else None
    try:
        timeout = early.plugin_timeout or timeout_from_env()
    except UserError as e:
        print(f"vdm: {e}", file=sys.stderr)
        return e.exit_status
    with _stdout_to_stderr():  # plugin code runs here: imports, hooks, checks, add_arguments
        plugins = load_plugins(only=only, timeout=timeout)
        parser = build_parser(plugins, command)
        if command == "list-plugins":
            plugins.ask_details()  # (availability and parts: shown by list-plugins only)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "_unavailable", None):
            parser.parse_args(argv)  # an unavailable command ignores its options; others report them
    except _Unavailable as e:
        args = _unavailable_command(e.args[0], argv)
    listing = getattr(args, "_list_plugins", False)
    for p in plugins.errors if not listing else []:
        print(f"vdm: plugin {p.name} ({p.distribution} {p.version}) {p.status}", file=sys.stderr)
    if plugins.unknown:
        where = "--plugins" if early.plugins else "VDM_PLUGINS"
        names = ", ".join(sorted({p.name for p in plugins.plugins})) or "none"
        print(
            f"vdm: {where}: no plugin named {', '.join(map(repr, plugins.unknown))} (installed: {names})",
            file=sys.stderr,
        )
    failed = bool(plugins.errors or plugins.unknown)
    if args.strict and failed and not listing:
        return 1
    args.plugin_set = plugins
    try:
        if listing:
            # with --strict, still list (it is how one finds the broken plugin), then fail
            status = list_plugins.run(args, plugins)
            return 1 if args.strict and failed else status
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
        status = cmd.run(args)
        if status is None or isinstance(status, int):
            return int(status or 0)
        print(
            f"vdm: {args.command} ({args._provider}) returned {type(status).__name__}, not an exit status",
            file=sys.stderr,
        )
        return 1
    except UserError as e:
        print(f"vdm: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
