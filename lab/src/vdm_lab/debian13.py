"""Run programs from a Debian 13 root next to the host's Debian 12: QEMU 10.0, libblkio 1.5, gcc.

``scripts/debian13/build.sh`` makes the root once per machine (mmdebstrap, cached, locked). A program
runs in it through ``scripts/debian13/enter.sh`` (``unshare --mount`` + ``chroot``): in a private
mount namespace the root gets /dev, /proc, /sys, a fresh tmpfs on /tmp, and every host path the
caller names bind-mounted at the SAME path, so sockets, images, kernels and initrds are named inside
exactly as outside, and files made in a named directory after the start (a vhost-user socket
re-created by a restarted backend) are seen too. The mounts vanish with the program; nothing is left
mounted on the host. The program is exec'ed in place of the wrapper, so its pid (and process group)
is the one Popen returns. Needs root (it is how the tests run here).

Typical use::

    from vdm_lab import debian13

    root = debian13.build()                      # Debian13Error when it cannot be built
    cmd = root.command(["qemu-system-x86_64", "--version"], visible=[tmp_path])
    subprocess.run(cmd, check=True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SCRIPTS = Path(__file__).resolve().parent / "scripts" / "debian13"  # scripts/debian13 in the repository
BUILD_SCRIPT = SCRIPTS / "build.sh"
SUITE = "trixie"
PACKAGES = "qemu-system-x86,libblkio1,libblkio-dev,gcc,libc6-dev"  # must match build.sh

ENTER_SCRIPT = SCRIPTS / "enter.sh"  # makes its own private mount namespace


class Debian13Error(RuntimeError):
    """The Debian 13 root could not be built (the message says why, with the end of the log)."""


def root_dir() -> Path:
    """Where the root is cached: ``$VDM_DEBIAN13_DIR`` or ``~/.cache/vdm/debian13``."""
    env = os.environ.get("VDM_DEBIAN13_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vdm" / "debian13"


@dataclasses.dataclass(frozen=True)
class Debian13Root:
    """A built Debian 13 root; ``info`` holds the versions build.sh recorded (qemu_version, libblkio1...)."""

    dir: Path
    info: Mapping[str, str]

    @property
    def qemu_version(self) -> str:
        return self.info.get("qemu_version", "?")

    def command(self, argv: Sequence[str], visible: Iterable[os.PathLike[str] | str] = (),
                cwd: os.PathLike[str] | str = "/") -> list[str]:
        """The host command that runs ``argv`` inside the root with the ``visible`` host paths.

        Every visible path must exist and be absolute; a directory is bound whole (later files in
        it are seen), a file alone. The cwd is inside the root (so it should be a visible path or /).
        """
        paths = []
        for p in visible:
            ap = Path(p)
            if not ap.is_absolute() or not ap.exists():
                raise ValueError(f"a visible path must exist and be absolute: {p}")
            paths.append(str(ap))
        return [str(ENTER_SCRIPT), str(self.dir), *paths, "--", str(cwd), *argv]

    def run(self, argv: Sequence[str], visible: Iterable[os.PathLike[str] | str] = (),
            cwd: os.PathLike[str] | str = "/", timeout: float = 300,
            **kw: object) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` of ``command(...)`` with text output captured (no check)."""
        return subprocess.run(self.command(argv, visible, cwd), capture_output=True, text=True,
                              timeout=timeout, **kw)  # type: ignore[call-overload]


_roots: dict[Path, Debian13Root] = {}
_lock = threading.Lock()


def _stamp() -> str:
    h = hashlib.sha256(BUILD_SCRIPT.read_bytes())
    h.update(f"{SUITE} {PACKAGES}\n".encode())
    return h.hexdigest()


def _load(root: Path) -> Debian13Root | None:
    try:
        if (root / ".vdm-debian13.stamp").read_text().strip() != _stamp():
            return None
        text = (root / ".vdm-debian13.txt").read_text()
    except OSError:
        return None
    if not os.access(root / "usr" / "bin" / "qemu-system-x86_64", os.X_OK):
        return None
    info = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    return Debian13Root(root, info)


def build(root: os.PathLike[str] | str | None = None, timeout: float = 900) -> Debian13Root:
    """Build the root (once per machine: build.sh is cached and locked) and return it.

    Raises Debian13Error when it cannot be built (not root, no mmdebstrap, no network on first use).
    """
    out = Path(root) if root is not None else root_dir()
    with _lock:
        if out in _roots:
            return _roots[out]
        found = _load(out)
        if found is None:
            try:
                proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Debian13Error(f"cannot run {BUILD_SCRIPT}: {e}") from e
            found = _load(out)
            if proc.returncode != 0 or found is None:
                raise Debian13Error(f"{BUILD_SCRIPT} {out} failed (rc={proc.returncode}): "
                                    f"{proc.stdout.strip()[-600:]}")
        _roots[out] = found
        return found
