"""An author's additions to the guest kit: kernel modules, workload scripts and files.

The kit's initramfs loads the modules listed in ``/etc/modules`` and then those in
``/etc/modules.extra``; a workload name that is not one of the kit's own runs
``/workloads/<name>`` (sourced by /init in a subshell, so it can use ``result`` and the
``P_<key>`` parameters; see :mod:`vdm_lab.results`). A :class:`GuestSpec` says what to add;
:func:`initrd_with` writes the kit's initramfs followed by a second, gzip-compressed cpio archive
holding the additions (Linux unpacks concatenated archives in order, later files win).

Modules come from the kit's own kernel package (the build's module index in ``kit.work``), with
their dependencies (read from each module's ``depends=``), signatures cut off like the kit's own;
modules the kit already loads, and those built into the kernel, are left out.

Invariants: every name written into the layer is checked (module and workload names are
``[a-z0-9_]+``, guest paths absolute without ``..``), so nothing lands outside the guest's root;
the layer is deterministic (same spec, same bytes: mtime 0, owner root).
"""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence, Union

from .kit import GuestKit

__all__ = ["GuestSpec", "LayerError", "cpio_newc", "initrd_with", "layer_bytes", "resolve_modules"]

NAME_RE = re.compile(r"^[a-z0-9_]+$")
_SIG_MAGIC = b"~Module signature appended~\n"
_DEPENDS_RE = re.compile(rb"(?:^|\0)depends=([^\0]*)")
Content = Union[str, bytes, os.PathLike]


class LayerError(ValueError):
    """A GuestSpec cannot be turned into a layer (unknown module, bad name, missing file)."""


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """What an author adds to the kit's guest.

    ``modules``: kernel module names (``virtio_input``; ``-`` and ``_`` are the same) loaded at
    boot after the kit's own, dependencies first. ``workloads``: workload name -> its shell
    script (text, or a path to a file); run it by naming it in the workloads of a run.
    ``files``: absolute guest path -> content (bytes, text, or a host file's path); a host
    file keeps its executable bit.
    """

    modules: Sequence[str] = ()
    workloads: Mapping[str, Content] = dataclasses.field(default_factory=dict)
    files: Mapping[str, Content] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.modules or self.workloads or self.files)


def _module_index(kit: GuestKit) -> tuple[dict[str, Path], set[str]]:
    try:
        index_text = (kit.work / "modindex").read_text()
        builtin = set((kit.work / "builtin").read_text().split())
    except OSError as e:
        raise LayerError(f"the kit's module index is missing ({e}); rebuild the kit "
                         f"(rm {kit.dir / 'kit.stamp'}, then run again)") from e
    index = {}
    for line in index_text.splitlines():
        name, _, path = line.partition(" ")
        index.setdefault(name, Path(path))
    return index, builtin


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        raise LayerError(f"{path}: zstd-compressed modules are not supported")
    if data.endswith(_SIG_MAGIC) and len(data) >= 40:  # struct module_signature (12 bytes) + magic
        sig_len = int.from_bytes(data[-32:-28], "big")
        data = data[: len(data) - sig_len - 40]
    return data


def resolve_modules(kit: GuestKit, names: Sequence[str]) -> list[tuple[str, bytes]]:
    """The modules to add for ``names``, dependencies first, as (name, .ko bytes).

    Modules the kit's /init already loads and built-in ones are left out. Raises LayerError for
    a module the kit's kernel does not have.
    """
    index, builtin = _module_index(kit)
    have = set(kit.guest_modules)
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(raw: str, wanted_by: str | None) -> None:
        name = raw.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name in builtin or name in have:
            return
        if not NAME_RE.match(name) or name not in index:
            who = f" (needed by {wanted_by})" if wanted_by else ""
            raise LayerError(f"kernel module {raw!r}{who} is not in the kit's kernel "
                             f"{kit.info.get('kernel_release', '?')}")
        data = _module_bytes(index[name])
        m = _DEPENDS_RE.search(data)
        for dep in (m.group(1).decode() if m else "").split(","):
            if dep:
                add(dep, name)
        out.append((name, data))

    for n in names:
        add(n, None)
    return out


def _content(value: Content) -> tuple[bytes, int]:
    """(bytes, mode) of a file's content: bytes/str as given (0644), a path read (0755 if executable)."""
    if isinstance(value, bytes):
        return value, 0o644
    if isinstance(value, str):
        return value.encode(), 0o644
    p = Path(value)
    try:
        return p.read_bytes(), 0o755 if os.access(p, os.X_OK) else 0o644
    except OSError as e:
        raise LayerError(f"cannot read {p}: {e}") from e


def _guest_path(path: str) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or len(p.parts) < 2:
        raise LayerError(f"guest path {path!r} must be absolute, below / and without '..'")
    return str(p).lstrip("/")


def cpio_newc(entries: Mapping[str, tuple[bytes | None, int]]) -> bytes:
    """A newc cpio archive of ``{path: (data or None for a directory, permission bits)}``.

    Parent folders are added before their files; owner root, mtime 0, sorted (reproducible).
    """
    full: dict[str, tuple[bytes | None, int]] = {}
    for path, entry in entries.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            full.setdefault("/".join(parts[:i]), (None, 0o755))
        full[path] = entry
    out = bytearray()

    def record(ino: int, name: str, mode: int, data: bytes) -> None:
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, path in enumerate(sorted(full), 1):
        data, perm = full[path]
        if data is None:
            record(ino, path, stat.S_IFDIR | perm, b"")
        else:
            record(ino, path, stat.S_IFREG | perm, data)
    record(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def layer_bytes(kit: GuestKit, spec: GuestSpec) -> bytes:
    """The spec's additions as one gzip-compressed newc cpio archive (to follow the kit's initrd)."""
    entries: dict[str, tuple[bytes | None, int]] = {}
    for dest, value in spec.files.items():
        entries[_guest_path(dest)] = _content(value)
    for name, value in spec.workloads.items():
        if not NAME_RE.match(name):
            raise LayerError(f"workload name {name!r} must be lower-case letters, digits and '_'")
        entries[f"workloads/{name}"] = (_content(value)[0], 0o755)
    modules = resolve_modules(kit, spec.modules)
    for name, data in modules:
        entries[f"lib/modules/{name}.ko"] = (data, 0o644)
    entries["etc/modules.extra"] = ("".join(f"{n}\n" for n, _ in modules).encode(), 0o644)
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)


def initrd_with(kit: GuestKit, spec: GuestSpec, dest: os.PathLike[str] | str,
                base: os.PathLike[str] | str | None = None) -> Path:
    """Write ``base`` (default: the kit's initrd) followed by the spec's layer to ``dest``; return it."""
    dest = Path(dest)
    layer = layer_bytes(kit, spec)
    base_path = Path(base) if base is not None else kit.initrd
    with open(base_path, "rb") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
        out.write(b"\0" * (-out.tell() % 4))  # an uncompressed base must end on a 4-byte boundary
        out.write(layer)
    return dest
