"""A real single-node Ceph cluster for the rbd protocol's tests, started in a tmp directory.

Debian's own daemons (``apt install ceph-mon ceph-osd ceph-common``): one monitor on a free
loopback port (msgr2), one OSD (``memstore`` by default: it starts in seconds and keeps its
objects in the daemon's memory; ``bluestore`` on a sparse file is there to compare), no manager
(librbd reads and writes without one), cephx on, pools of size 1. Every file lives in the
directory given, every daemon runs in the foreground as a child of the test and is killed by
:meth:`CephCluster.stop` (the fixture's teardown), whatever happened before.

:func:`missing` says why a cluster cannot run here (None when it can); tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

__all__ = ["CephCluster", "missing"]

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")
START_TIMEOUT = 120.0


def missing() -> str | None:
    """None when a cluster can be started here, else why not (the packages to install)."""
    gone = [t for t in TOOLS if shutil.which(t) is None]
    if gone:
        return f"{', '.join(gone)} not found (apt install ceph-mon ceph-osd ceph-common)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    """One mon + one OSD in ``root``; ``conf`` and ``keyring`` are what a client needs."""

    def __init__(self, root: Path, *, objectstore: str = "memstore", store_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.objectstore = objectstore
        self.store_bytes = store_bytes
        self.conf = self.root / "ceph.conf"
        self.keyring = self.root / "keyring"
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        #: seconds from nothing to a pool that takes writes (measured by start())
        self.startup_seconds = 0.0

    # ---- helpers -----------------------------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = 60.0, input: str | None = None) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r.stdout

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """Run the ``ceph`` CLI as client.admin against this cluster."""
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "30", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """Run the ``rbd`` CLI as client.admin against this cluster."""
        return self._run("rbd", "-c", str(self.conf), *args, timeout=timeout)

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "wb")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.port}]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring}
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
pid file = {r}/run/$name.pid
mon data = {r}/$name
osd data = {r}/$name
osd objectstore = {self.objectstore}
memstore device bytes = {self.store_bytes}
bluestore block path = {r}/$name.block
bluestore block create = true
bluestore block size = {self.store_bytes}
bluestore fsck on mkfs = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon osd down out interval = 0
osd max object name len = 256
osd max object namespace len = 64
osd op num shards = 1
osd op num threads per shard = 2
osd memory target = 536870912
"""
        )

    # ---- life cycle --------------------------------------------------------------------------------

    def start(self) -> CephCluster:
        """Create and start the cluster (mon, OSD, pool ``rbd``); raise with the daemons' logs if not."""
        t0 = time.monotonic()
        for d in ("run", "log", "mon.a", "osd.0"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        kr = str(self.keyring)
        self._run(
            "ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"
        )
        self._run(
            "ceph-authtool", kr, "--gen-key", "-n", "client.admin",
            "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
        )  # fmt: skip
        monmap = str(self.root / "monmap")
        self._run(
            "monmaptool",
            "--create",
            "--fsid",
            self.fsid,
            "--addv",
            "a",
            f"[v2:127.0.0.1:{self.port}]",
            monmap,
        )
        conf = ["-c", str(self.conf)]
        self._run("ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", kr)
        try:
            self._daemon("mon.a", ["ceph-mon", *conf, "-f", "-i", "a"])
            osd_uuid = str(uuid.uuid4())
            osd_id = self.ceph("osd", "new", osd_uuid).strip()
            if osd_id != "0":
                raise RuntimeError(f"ceph osd new gave id {osd_id!r}, expected 0")
            osd_kr = str(self.root / "osd.0" / "keyring")
            self.ceph(
                "auth", "get-or-create", "osd.0", "mon", "allow profile osd", "osd", "allow *",
                "mgr", "allow profile osd", "-o", osd_kr,
            )  # fmt: skip
            self._run(
                "ceph-osd",
                *conf,
                "-i",
                "0",
                "--mkfs",
                "--osd-uuid",
                osd_uuid,
                "--keyring",
                osd_kr,
                timeout=120,
            )
            self._daemon("osd.0", ["ceph-osd", *conf, "-f", "-i", "0", "--keyring", osd_kr])
            self.ceph("osd", "pool", "create", "rbd", "8", "8")
            self.ceph("osd", "pool", "set", "rbd", "size", "1", "--yes-i-really-mean-it")
            self.ceph("osd", "pool", "application", "enable", "rbd", "rbd")
            self._wait_writable()
        except BaseException as e:
            logs = self.logs()
            self.stop()
            if isinstance(e, Exception):
                raise RuntimeError(f"the Ceph cluster did not start: {e}\n{logs}") from None
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_writable(self) -> None:
        """Until an object write to the pool succeeds (the PGs are active)."""
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}")
            try:
                self._run(
                    "rados", "-c", str(self.conf), "--rados-osd-op-timeout", "5", "-p", "rbd",
                    "put", "probe", "-", input="x", timeout=20,
                )  # fmt: skip
                return
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                last = str(e)
                time.sleep(0.5)
        raise RuntimeError(f"the pool took no write in {START_TIMEOUT:g} s: {last}")

    def create_image(self, name: str, size: int, *features: str) -> str:
        """``rbd create rbd/NAME --size SIZE``; the ``rbd:`` disk name for it (client.admin)."""
        args = ["create", f"rbd/{name}", "--size", f"{size}B"]
        if features:
            args += ["--image-feature", ",".join(features)]
        self.rbd(*args)
        return self.disk_name(name)

    def disk_name(self, image: str, snap: str | None = None) -> str:
        """The vdm disk name of an image in pool ``rbd``, with this cluster's conf and keyring."""
        at = f"@{snap}" if snap else ""
        return f"rbd:rbd/{image}{at}:conf={self.conf}:id=admin"

    def kill(self, name: str) -> None:
        """Kill one daemon (``mon.a``, ``osd.0``) now."""
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self) -> None:
        """Kill every daemon this cluster started (idempotent)."""
        for name in list(self.procs):
            self.kill(name)

    def logs(self, tail: int = 20) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def env_without_ceph_args() -> dict[str, str]:
    """The environment minus CEPH_ARGS (a user's own cluster settings must not leak into tests)."""
    env = dict(os.environ)
    env.pop("CEPH_ARGS", None)
    return env
