"""The guest kit: a Debian kernel plus a busybox initramfs that runs workloads and reports them.

``guestkit()`` builds the kit once per machine with the kit's ``build.sh`` (shipped in this
package, ``vdm_lab/scripts/guestkit``; cached and locked by the script) into ``$VDM_GUESTKIT_DIR``
or ``~/.cache/vdm/guestkit`` and returns a :class:`GuestKit` with the paths of its files. The
initramfs's ``/init`` and its protocol are described in :mod:`vdm_lab.results`; an author's own
kernel modules and workloads are added with :mod:`vdm_lab.layer`.

Invariant: a :class:`GuestKit` returned here names files that exist and match the build inputs
(``kit.stamp`` is the hash of the scripts); an out-of-date kit is rebuilt before it is returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Mapping

__all__ = ["KIT_FILES", "GuestKit", "GuestKitError", "guestkit", "kit_dir", "scripts_dir"]


def scripts_dir() -> Path:
    """The folder holding the kit's, the KVM lab's and the Debian 13 root's build scripts."""
    return Path(__file__).resolve().parent / "scripts"


BUILD_SCRIPT = scripts_dir() / "guestkit" / "build.sh"
KIT_FILES = ("vmlinuz", "vmlinux", "initrd.cpio", "initrd.cpio.gz", "initrd-fio.cpio", "initrd-fio.cpio.gz",
             "lab-initrd.cpio.gz", "kit.txt")


class GuestKitError(RuntimeError):
    """The guest kit could not be built (the message carries the build log)."""


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """Paths of a built guest kit (see the kit's README: scripts/guestkit/README.md).

    ``info`` is kit.txt: package versions and ``guest_modules`` (the modules /init loads, in order).
    """

    dir: Path
    vmlinuz: Path
    vmlinux: Path
    initrd: Path  # initrd.cpio.gz
    initrd_fio: Path  # initrd-fio.cpio, uncompressed: gunzip of its 92 MB takes seconds under TCG
    lab_initrd: Path
    info: Mapping[str, str]

    @property
    def work(self) -> Path:
        """The build's work folder: the unpacked kernel package and its module index."""
        return self.dir / ".work"

    @property
    def guest_modules(self) -> tuple[str, ...]:
        """The modules the kit's /init loads, dependencies first."""
        return tuple(self.info.get("guest_modules", "").split())


def kit_dir() -> Path:
    """Where the kit is cached: ``$VDM_GUESTKIT_DIR`` or ``~/.cache/vdm/guestkit``."""
    env = os.environ.get("VDM_GUESTKIT_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vdm" / "guestkit"


_kits: dict[Path, GuestKit] = {}
_kits_lock = threading.Lock()


def guestkit(outdir: os.PathLike[str] | str | None = None, timeout: float = 900) -> GuestKit:
    """Build the kit (once per machine: build.sh is cached and locked) and return its paths.

    Raises GuestKitError when the build fails (no apt, no network on first use, missing tools).
    """
    out = Path(outdir) if outdir is not None else kit_dir()
    with _kits_lock:
        if out in _kits:
            return _kits[out]
        if _kit_is_current(out):  # skips starting bash (seconds inside the KVM lab)
            _kits[out] = _kit_paths(out)
            return _kits[out]
        try:
            proc = subprocess.run(
                ["bash", str(BUILD_SCRIPT), str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GuestKitError(f"cannot run {BUILD_SCRIPT}: {e}") from e
        if proc.returncode != 0:
            raise GuestKitError(f"{BUILD_SCRIPT} {out} failed (rc={proc.returncode}):\n{proc.stdout}")
        _kits[out] = _kit_paths(out)
        return _kits[out]


def _kit_is_current(out: Path) -> bool:
    """The same test build.sh makes first: kit.stamp is the hash of its inputs, all files exist."""
    h = hashlib.sha256()
    kit_scripts = BUILD_SCRIPT.parent
    lab_scripts = scripts_dir() / "kvmlab"
    for p in (BUILD_SCRIPT, kit_scripts / "modules.sh", kit_scripts / "init.sh",
              lab_scripts / "l2-init.sh", lab_scripts / "kvmhold.py"):
        h.update(p.read_bytes())
    h.update(b"amd64\n")
    try:
        stamp = (out / "kit.stamp").read_text().strip()
    except OSError:
        return False
    return stamp == h.hexdigest() and all((out / f).is_file() and (out / f).stat().st_size for f in KIT_FILES)


def _kit_paths(out: Path) -> GuestKit:
    info = {}
    for line in (out / "kit.txt").read_text().splitlines():
        k, _, v = line.partition("=")
        info[k] = v
    return GuestKit(
        dir=out,
        vmlinuz=out / "vmlinuz",
        vmlinux=out / "vmlinux",
        initrd=out / "initrd.cpio.gz",
        initrd_fio=out / "initrd-fio.cpio",
        lab_initrd=out / "lab-initrd.cpio.gz",
        info=info,
    )
