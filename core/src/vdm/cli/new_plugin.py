"""``vdm new-plugin NAME --kind device|hypervisor``: start a third-party plugin distribution.

It writes a new folder ``vdm-NAME/`` with a ``pyproject.toml`` declaring the ``vdm.plugins`` entry
point, a package ``vdm_NAME`` (a one-queue :class:`~vdm.device.VirtioDevice` skeleton, or a
hypervisor's VMM-hooks object) and tests that use :mod:`vdm.testing`; a device project also gets
a real-guest test on ``vdm_lab`` (it skips, saying why, without QEMU or the guest kit). The tests
pass as generated once the project is installed with its test extra (``pip install -e '.[test]'``).
The skeleton's comments and its ``DeviceType.virtio_id`` follow ``--device-id``.

This module also renders the hook reference of ``docs/plugins.md`` from the docstrings in
:mod:`vdm.hookspecs`: ``python -m vdm.cli.new_plugin --hook-reference`` prints it and
``--update-docs docs/plugins.md`` rewrites the generated part of that file.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import string
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .. import API_VERSION, __version__, hookspecs
from ..errors import UserError
from ..registry import Command
from ..templates import KINDS

__all__ = ["add_parser", "generate", "hook_reference", "project_names", "run", "update_docs"]

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
BEGIN = "<!-- BEGIN HOOK REFERENCE: generated from vdm/hookspecs.py by "
BEGIN_LINE = BEGIN + "`python -m vdm.cli.new_plugin --update-docs docs/plugins.md`; do not edit -->"
END_LINE = "<!-- END HOOK REFERENCE -->"


# ---- the command ----------------------------------------------------------------------------------


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the plugin's name: lower case, digits and dashes (e.g. 'rng', 'my-hv')")
    p.add_argument("--kind", choices=sorted(KINDS), required=True, help="what the plugin provides")
    p.add_argument(
        "--directory", "-C", default=".", metavar="DIR", help="create the project folder in DIR (default: .)"
    )
    p.add_argument(
        "--device-id", type=_device_id, default=0, metavar="N",
        help="virtio device id for a device plugin (virtio 1.2 section 5; default 0, 'no device')",
    )


def _device_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{value} is not a 16-bit virtio device id")
    return value


def _run(args: argparse.Namespace) -> int:
    target = generate(args.name, args.kind, Path(args.directory), device_id=args.device_id)
    names = project_names(args.name)
    installed = getattr(args, "plugin_set", None)
    for p in installed.plugins if installed is not None else []:
        if args.name in (p.name, *p.devices, *p.hypervisors, *p.servers):
            print(f"note: {p.distribution} already provides '{args.name}'; installing both is a conflict "
                  "(see VDM_PREFER)", file=sys.stderr)
    print(f"created {names['dist']} ({args.kind} plugin) in {target}")
    for path in sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file()):
        print(f"  {path}")
    print(f"next: cd {target} && pip install -e '.[test]' && python -m pytest && vdm list-plugins")
    return 0


COMMAND = Command(
    name="new-plugin",
    help="create a new device or hypervisor plugin project (a distribution with tests)",
    add_arguments=_add_arguments,
    run=_run,
)


def add_parser(sub: Any) -> None:
    """Add ``new-plugin`` to ``vdm``'s subcommands (dispatched like a plugin's command)."""
    p = sub.add_parser(COMMAND.name, help=COMMAND.help, description=COMMAND.help)
    p.set_defaults(_command=COMMAND, _unavailable=None, _provider="vdm-core")
    COMMAND.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return _run(args)


def project_names(name: str) -> dict[str, str]:
    """The names derived from a plugin name: distribution, package, class prefix, TOML key."""
    if not NAME_RE.match(name):
        raise UserError(
            f"new-plugin: '{name}' is not a plugin name (lower case letters, digits and single dashes, "
            "starting with a letter)"
        )
    if name.startswith("vdm-") or name == "vdm":
        raise UserError(f"new-plugin: name it without the 'vdm-' prefix ('{name[4:] or 'x'}'): it is added")
    return {
        "name": name,
        "dist": f"vdm-{name}",
        "pkg": "vdm_" + name.replace("-", "_"),
        "cls": "".join(part.capitalize() for part in name.split("-")),
        "toml": name.replace("-", "_"),
    }


def generate(name: str, kind: str, parent: Path, *, device_id: int = 0) -> Path:
    """Write the project for plugin ``name`` of ``kind`` into ``parent/vdm-NAME``; return that path.

    Refuses (:class:`~vdm.errors.UserError`) if the folder exists. The files are written to a
    temporary folder next to it first, so a failure never leaves half a project behind.
    """
    if kind not in KINDS:
        raise UserError(f"new-plugin: --kind must be one of {', '.join(sorted(KINDS))}, not '{kind}'")
    names = project_names(name)
    if not 0 <= device_id <= 0xFFFF:
        raise UserError(f"new-plugin: --device-id {device_id} is not a 16-bit virtio device id")
    target = parent / names["dist"]
    if target.exists() or target.is_symlink():
        raise UserError(
            f"new-plugin: {target} already exists; not overwriting it (remove it or pick another name)"
        )
    if not parent.is_dir():
        raise UserError(f"new-plugin: {parent} is not a directory")
    values = dict(names, kind=kind, api=str(API_VERSION), core_version=__version__, device_id=str(device_id),
                  **device_id_values(device_id))
    tmp = Path(tempfile.mkdtemp(prefix=f".{names['dist']}-", dir=parent))
    try:
        for module in KINDS[kind]:
            for rel, text in module.FILES.items():
                path = tmp / string.Template(rel).substitute(values)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(string.Template(text).substitute(values))
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():  # created meanwhile: still never overwrite
            raise UserError(f"new-plugin: {target} already exists; not overwriting it")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


#: virtio device ids (virtio 1.2 section 5) named in the generated skeleton's comments
VIRTIO_DEVICE_NAMES = {
    1: "network card", 2: "block device", 3: "console", 4: "entropy source", 5: "memory balloon",
    8: "SCSI host", 9: "9P transport", 16: "GPU device", 18: "input device", 19: "socket device",
    20: "crypto device", 24: "memory device", 25: "sound device", 26: "file system device",
    34: "I2C adapter", 41: "GPIO device",
}


def device_id_values(device_id: int) -> dict[str, str]:
    """The template values that follow ``--device-id``: the skeleton's comment and ``virtio_id``."""
    if device_id == 0:
        comment = ('0 is "no device": a guest driver ignores it, which is right until the device\n'
                   "    #: does something real; then set its id here and as virtio_id in plugin.py.")
        return {"device_id_comment": comment, "virtio_id": "None"}
    what = VIRTIO_DEVICE_NAMES.get(device_id)
    kind = f"{device_id} is the {what}" if what else f"{device_id} is your device type's id"
    comment = (f"{kind}: the guest's driver for that id binds this device and must find\n"
               "    #: the features and configuration it expects.")
    return {"device_id_comment": comment, "virtio_id": str(device_id)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- the hook reference of docs/plugins.md ---------------------------------------------------------

_ROLE = re.compile(r":(?:class|meth|func|data|mod|attr):`~?([^`]+)`")
_FIELD = re.compile(r"^:(param (\w+)|returns?):\s*(.*)$")


def _hooks(spec: type, project: str) -> list[tuple[str, Any, dict]]:
    marker = f"{project}_spec"
    return [
        (name, fn, getattr(fn, marker))
        for name, fn in vars(spec).items()
        if callable(fn) and hasattr(fn, marker)
    ]


_SPECS = ((hookspecs.PluginSpec, hookspecs.PROJECT), (hookspecs.VmmSpec, hookspecs.VMM_PROJECT))


def all_hooks() -> dict[str, list[str]]:
    """Every hook name, per spec class (``PluginSpec``, ``VmmSpec``), in definition order."""
    return {spec.__name__: [name for name, _, _ in _hooks(spec, project)] for spec, project in _SPECS}


def _markdown(doc: str) -> str:
    """A hookspec docstring (reST-flavoured) as Markdown: roles to code, fields to a list."""
    out: list[str] = []
    in_field = False
    for line in doc.splitlines():
        line = _ROLE.sub(r"`\1`", line).replace("``", "`")
        m = _FIELD.match(line.strip())
        if m:
            label = f"`{m.group(2)}`" if m.group(2) else "returns"
            out.append(f"- {label}: {m.group(3)}")
            in_field = True
        elif in_field and line.startswith(" ") and line.strip():
            out.append("  " + line.strip())
        else:
            in_field = False
            out.append(line)
    return "\n".join(out).strip()


def _signature(name: str, fn: Any) -> str:
    sig = inspect.signature(fn)
    params = [
        f"{p.name}: {p.annotation}" if p.annotation is not inspect.Parameter.empty else p.name
        for p in list(sig.parameters.values())[1:]
    ]
    ret = sig.return_annotation
    returns = f" -> {ret}" if ret is not inspect.Signature.empty else ""
    return f"def {name}({', '.join(params)}){returns}: ..."


def hook_reference() -> str:
    """The hook reference (Markdown) rendered from :mod:`vdm.hookspecs`'s docstrings."""
    parts = []
    for spec, project, marker in (
        (hookspecs.PluginSpec, hookspecs.PROJECT, "hookimpl"),
        (hookspecs.VmmSpec, hookspecs.VMM_PROJECT, "vmmimpl"),
    ):
        parts.append(f"### `{spec.__name__}`: implemented with `@vdm.{marker}`\n")
        parts.append(_markdown(inspect.getdoc(spec) or "") + "\n")
        for name, fn, opts in _hooks(spec, project):
            parts.append(f"#### `{name}`\n")
            parts.append(f"```python\n{_signature(name, fn)}\n```\n")
            if opts.get("firstresult"):
                parts.append("*firstresult*: the first implementation that returns something other than "
                             "`None` answers.\n")
            parts.append(_markdown(inspect.getdoc(fn) or "(undocumented)") + "\n")
    return "\n".join(parts).rstrip() + "\n"


def update_docs(path: Path, *, check: bool = False) -> bool:
    """Replace the generated hook reference in ``path``; return whether it was out of date.

    With ``check``, only report; the file is not written.
    """
    text = path.read_text()
    start = text.find(BEGIN)
    end = text.find(END_LINE)
    if start < 0 or end < start:
        raise UserError(f"{path}: no hook reference markers ({BEGIN_LINE} ... {END_LINE})")
    new = text[:start] + BEGIN_LINE + "\n\n" + hook_reference() + "\n" + text[end:]
    if new == text:
        return False
    if not check:
        path.write_text(new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.cli.new_plugin", description="render the hook reference of docs/plugins.md"
    )
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--hook-reference", action="store_true", help="print the reference (Markdown)")
    g.add_argument("--update-docs", metavar="FILE", type=Path, help="rewrite FILE's generated section")
    g.add_argument("--check-docs", metavar="FILE", type=Path, help="exit 1 if FILE's section is stale")
    args = parser.parse_args(argv)
    try:
        if args.hook_reference:
            sys.stdout.write(hook_reference())
            return 0
        if args.update_docs:
            print(f"{args.update_docs}: " + ("updated" if update_docs(args.update_docs) else "up to date"))
            return 0
        stale = update_docs(args.check_docs, check=True)
        if stale:
            print(f"{args.check_docs}: hook reference out of date; run --update-docs", file=sys.stderr)
        return int(stale)
    except UserError as e:
        print(f"vdm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
