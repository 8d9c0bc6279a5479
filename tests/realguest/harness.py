"""Boot real Linux guests for vdm's tests: the guest kit, a QEMU (TCG) runner and the KVM lab.

The guest kit (``scripts/guestkit/``) is a Debian kernel plus a busybox initramfs whose /init runs
workloads named on the kernel command line and prints one ``VDMTEST RESULT`` line per workload.
The KVM lab (``scripts/kvmlab/``) is a QEMU TCG guest (``-cpu max``: AMD SVM) that loads kvm_amd and
runs a script in the host's root, shared read-only over 9p: a hardware-style ``/dev/kvm`` for vdm.

Typical use in a test::

    from tests.realguest import harness

    kit = harness.guestkit()
    r = harness.run_qemu(harness.virtio_blk_args(image), ["blk", "fs"], {"mib": 8}, timeout=120, kit=kit)
    r.assert_ok("blk", "fs")
    assert r["blk"]["md5"] == md5_of(image, 8 << 20)

    lab = harness.run_in_kvm_lab("python3 -c 'import vdm'", timeout=300, kit=kit)
    lab.assert_ok()

Two QEMUs: the host's (Debian 12, 7.2) and Debian 13's (10.0) from the root scripts/debian13/build.sh
makes (``debian13.py``); ``run_qemu(..., qemu=harness.debian13_qemu(), visible=[tmp_path])`` boots
the kit under QEMU 10 with the kit and ``visible`` bind-mounted at their own paths. The
``qemu_frontend`` fixture (conftest.py) runs a test against each, the version in its id.

This module uses the standard library only and doubles as a command line tool
(``python3 tests/realguest/harness.py --help``); ``scripts/kvmlab/run.sh`` wraps its ``lab`` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

try:
    from tests.realguest import debian13, labwatch
except ImportError:  # run as a script: python3 tests/realguest/harness.py
    import debian13  # type: ignore[no-redef]
    import labwatch  # type: ignore[no-redef]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "guestkit" / "build.sh"
QEMU = "qemu-system-x86_64"
RESULT_RE = re.compile(r"VDMTEST RESULT (\S+) (ok|fail|skip)\b(.*)$")
KEY_RE = re.compile(r"^[a-z0-9_]+$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a kernel command line value must not split into two words or carry shell/quote characters
VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]*$")


class GuestKitError(RuntimeError):
    """The guest kit could not be built (the message carries the build log)."""


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """Paths of a built guest kit (see scripts/guestkit/README.md)."""

    dir: Path
    vmlinuz: Path
    vmlinux: Path
    initrd: Path  # initrd.cpio.gz
    initrd_fio: Path  # initrd-fio.cpio, uncompressed: gunzip of its 92 MB takes seconds under TCG
    lab_initrd: Path
    info: Mapping[str, str]


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


KIT_FILES = ("vmlinuz", "vmlinux", "initrd.cpio", "initrd.cpio.gz", "initrd-fio.cpio", "initrd-fio.cpio.gz",
             "lab-initrd.cpio.gz", "kit.txt")


def _kit_is_current(out: Path) -> bool:
    """The same test build.sh makes first: kit.stamp is the hash of its inputs, all files exist."""
    h = hashlib.sha256()
    for p in (BUILD_SCRIPT, BUILD_SCRIPT.parent / "modules.sh", BUILD_SCRIPT.parent / "init.sh",
              REPO / "scripts" / "kvmlab" / "l2-init.sh", REPO / "scripts" / "kvmlab" / "kvmhold.py"):
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


def qemu_binary() -> str | None:
    """The path of qemu-system-x86_64, or None."""
    return shutil.which(QEMU)


@dataclasses.dataclass(frozen=True)
class QemuFrontend:
    """One QEMU to boot the kit with: the host's (Debian 12: 7.2) or Debian 13's (10.0, in its root).

    ``name`` goes into test ids ("qemu7.2", "qemu10.0"); ``version`` is the full one (10.0.13).
    ``argv(visible)`` is the command prefix to pass as run_qemu's ``qemu``: for the Debian 13 QEMU
    the host paths its arguments name (kit, images, socket directories) must be listed in ``visible``.
    """

    name: str
    version: str
    root: debian13.Debian13Root | None = None

    def argv(self, visible: Iterable[os.PathLike[str] | str] = ()) -> list[str]:
        if self.root is None:
            return [QEMU]
        return self.root.command([QEMU], visible)

    def __str__(self) -> str:
        where = f" from the Debian 13 root {self.root.dir}" if self.root else " (host)"
        return f"QEMU {self.version}{where}"


def host_qemu() -> QemuFrontend | None:
    """The host's qemu-system-x86_64 as a QemuFrontend, or None when it is not installed."""
    path = qemu_binary()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)(\.\d+)?", out)
    version = m.group(0).split()[1] if m else "?"
    return QemuFrontend(f"qemu{m.group(1)}.{m.group(2)}" if m else "qemu?", version)


def debian13_qemu() -> QemuFrontend:
    """Debian 13's QEMU (10.0); builds the root on first use. Raises debian13.Debian13Error."""
    root = debian13.build()
    major_minor = ".".join(root.qemu_version.split(".")[:2])
    return QemuFrontend(f"qemu{major_minor}", root.qemu_version, root)


# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class WorkloadResult:
    """One ``VDMTEST RESULT <name> <status> key=value ...`` line."""

    name: str
    status: str
    values: dict[str, str]
    line: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


def parse_keyvalues(text: str) -> dict[str, str]:
    """``a=1 b=x`` -> {"a": "1", "b": "x"}; words without ``=`` are ignored."""
    out = {}
    for word in text.split():
        k, sep, v = word.partition("=")
        if sep:
            out[k] = v
    return out


def parse_results(log: str) -> tuple[dict[str, str] | None, list[WorkloadResult], bool]:
    """(the INIT line's keys or None, the RESULT lines in order, whether DONE was printed)."""
    init = None
    results = []
    done = False
    for raw in log.splitlines():
        line = raw.strip("\r")
        i = line.find("VDMTEST ")
        if i < 0:
            continue
        line = line[i:]
        if line.startswith("VDMTEST INIT "):
            init = parse_keyvalues(line[len("VDMTEST INIT ") :])
        elif line.startswith("VDMTEST DONE"):
            done = True
        else:
            m = RESULT_RE.match(line)
            if m:
                results.append(WorkloadResult(m.group(1), m.group(2), parse_keyvalues(m.group(3)), line))
    return init, results, done


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass
class GuestResult:
    """What one QEMU run of the kit produced."""

    command: list[str]
    log: str
    returncode: int | None
    timed_out: bool
    elapsed_s: float
    init: dict[str, str] | None
    results: list[WorkloadResult]
    done: bool
    frontend: str = ""  # "QEMU 10.0.13 from the Debian 13 root ..." when run_qemu got a QemuFrontend

    def __getitem__(self, workload: str) -> WorkloadResult:
        r = self.get(workload)
        if r is None:
            raise KeyError(f"no RESULT line for {workload!r}\n{self.describe()}")
        return r

    def get(self, workload: str) -> WorkloadResult | None:
        for r in self.results:
            if r.name == workload:
                return r
        return None

    def describe(self, lines: int = 80) -> str:
        """A failure message: how the run ended and the end of the serial log."""
        how = "timed out" if self.timed_out else f"exit code {self.returncode}"
        which = f"[{self.frontend}] " if self.frontend else ""
        return (
            f"{which}QEMU {how} after {self.elapsed_s:.1f} s; command:\n  {shlex.join(self.command)}\n"
            f"--- last {lines} lines of the serial log ---\n{_tail(self.log, lines)}"
        )

    def assert_ok(self, *workloads: str) -> None:
        """Every named workload printed ``ok`` (all RESULT lines when none are named)."""
        names = workloads or tuple(r.name for r in self.results)
        if not names:
            raise AssertionError(f"the guest printed no RESULT line\n{self.describe()}")
        bad = []
        for name in names:
            r = self.get(name)
            if r is None:
                bad.append(f"{name}: no RESULT line")
            elif not r.ok:
                bad.append(f"{name}: {r.line}")
        if bad:
            raise AssertionError("; ".join(bad) + "\n" + self.describe())


# ---------------------------------------------------------------------------------------------
# QEMU command lines


def kernel_cmdline(workloads: Iterable[str], params: Mapping[str, object] | None = None,
                   extra: str = "") -> str:
    """The kit's kernel command line; keys and values are checked (no spaces, no quotes)."""
    wls = list(workloads)
    for w in wls:
        if not KEY_RE.match(w):
            raise ValueError(f"bad workload name {w!r}")
    parts = ["console=ttyS0", "panic=-1", "quiet", "vdmtest=" + ",".join(wls or ["boot"])]
    for k, v in (params or {}).items():
        sv = str(v)
        if not KEY_RE.match(k) or not VALUE_RE.match(sv):
            raise ValueError(f"bad guest parameter {k}={sv!r}")
        parts.append(f"vdmtest.{k}={sv}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def virtio_blk_args(image: os.PathLike[str] | str, index: int = 0, fmt: str = "raw",
                    cache: str = "none") -> list[str]:
    """QEMU's built-in virtio-blk-pci on a host image (the peer baseline).

    ``cache="none"`` (O_DIRECT, aio=native) is what the figures use; tmpfs (the KVM lab's /mnt)
    has no O_DIRECT, use ``cache="writeback"`` there.
    """
    aio = ",aio=native" if cache == "none" else ""
    return [
        "-drive", f"id=vblk{index},file={image},format={fmt},if=none,cache={cache}{aio}",
        "-device", f"virtio-blk-pci,drive=vblk{index}",
    ]


def shared_memory_args(memory_mib: int) -> list[str]:
    """Guest RAM in a shareable memfd, as vhost-user needs (run_qemu adds it by itself)."""
    return ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"]


def vhost_user_blk_args(socket_path: os.PathLike[str] | str, index: int = 0,
                        num_queues: int | None = None) -> list[str]:
    """A vhost-user-blk-pci device whose backend listens on ``socket_path``."""
    dev = f"vhost-user-blk-pci,chardev=vub{index}"
    if num_queues is not None:
        dev += f",num-queues={num_queues}"
    return ["-chardev", f"socket,id=vub{index},path={socket_path}", "-device", dev]


def vhost_user_net_args(socket_path: os.PathLike[str] | str, index: int = 0,
                        mac: str | None = None) -> list[str]:
    """A virtio-net-pci device on a vhost-user netdev whose backend listens on ``socket_path``."""
    dev = f"virtio-net-pci,netdev=vun{index}"
    if mac:
        dev += f",mac={mac}"
    return [
        "-chardev", f"socket,id=vunc{index},path={socket_path}",
        "-netdev", f"vhost-user,id=vun{index},chardev=vunc{index}",
        "-device", dev,
    ]


def user_net_args(index: int = 0, mac: str | None = None) -> list[str]:
    """QEMU's built-in virtio-net-pci on user networking (the host is 10.0.2.2 from the guest)."""
    dev = f"virtio-net-pci,netdev=unet{index}"
    if mac:
        dev += f",mac={mac}"
    return ["-netdev", f"user,id=unet{index}", "-device", dev]


def _has_machine(args: Sequence[str]) -> bool:
    return any(a in ("-M", "-machine") for a in args)


def qemu_command(
    extra_args: Sequence[str] = (),
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    *,
    kit: GuestKit,
    memory_mib: int | None = None,
    cpus: int = 1,
    initrd: str | os.PathLike[str] = "initrd",
    kernel: os.PathLike[str] | str | None = None,
    shared_memory: bool | None = None,
    append: str = "",
    accel: str = "tcg",
    qemu: str | Sequence[str] = QEMU,
) -> list[str]:
    """The qemu-system-x86_64 command line run_qemu uses (see there)."""
    if isinstance(initrd, str) and initrd in ("initrd", "fio"):
        initrd_path: os.PathLike[str] | str = kit.initrd if initrd == "initrd" else kit.initrd_fio
    else:
        initrd_path = initrd
    if memory_mib is None:
        memory_mib = 512 if initrd == "fio" else 256
    extra = list(extra_args)
    if shared_memory is None:
        shared_memory = any("vhost-user" in a for a in extra)
    cpu = "max" if accel.startswith("tcg") else "host"
    prefix = [qemu] if isinstance(qemu, str) else list(qemu)
    cmd = [*prefix, "-accel", accel, "-cpu", cpu, "-smp", str(cpus), "-m", f"{memory_mib}M",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]
    if shared_memory:
        cmd += shared_memory_args(memory_mib)
    if not _has_machine(extra):
        cmd += ["-M", "q35,memory-backend=mem" if shared_memory else "q35"]
    cmd += ["-kernel", str(kernel or kit.vmlinux), "-initrd", str(initrd_path),
            "-append", kernel_cmdline(workloads, params, append)]
    return cmd + extra


def _run_logged(cmd: Sequence[str], timeout: float, on_line: Callable[[str], None] | None,
                stop: Callable[[str], bool] | None = None,
                abort: Callable[[], bool] | None = None) -> tuple[str, int | None, bool, float]:
    """Run cmd with stdout+stderr captured line by line; kill its process group on timeout.

    ``abort`` is polled a few times a second; when it returns True the run is killed as if it
    had timed out. Returns (log, returncode or None when killed, timed_out, elapsed seconds).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    stopped = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if on_line is not None:
                try:
                    on_line(line)
                except Exception as e:  # a callback's error must not hang the run
                    lines.append(f"HARNESS on_line callback raised {e!r}")
            if stop is not None and stop(line):
                stopped.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    deadline = t0 + timeout
    while proc.poll() is None:
        if stopped.is_set():
            try:  # let the guest finish its shutdown, then make sure it ends
                proc.wait(3)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
            break
        if time.monotonic() > deadline or (abort is not None and abort()):
            timed_out = True
            _kill_group(proc)
            break
        time.sleep(0.05)
    proc.wait()
    th.join(5)
    elapsed = time.monotonic() - t0
    rc = None if timed_out else proc.returncode
    return "\n".join(lines), rc, timed_out, elapsed


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_qemu(
    extra_args: Sequence[str] = (),
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    timeout: float = 120,
    *,
    kit: GuestKit | None = None,
    memory_mib: int | None = None,
    cpus: int = 1,
    initrd: str | os.PathLike[str] = "initrd",
    kernel: os.PathLike[str] | str | None = None,
    shared_memory: bool | None = None,
    append: str = "",
    on_line: Callable[[str], None] | None = None,
    accel: str = "tcg",
    qemu: str | Sequence[str] | QemuFrontend = QEMU,
    visible: Iterable[os.PathLike[str] | str] = (),
) -> GuestResult:
    """Boot the kit under QEMU TCG (q35, ``-no-reboot``, serial on stdio) and collect its results.

    ``extra_args`` adds devices (``virtio_blk_args``, ``vhost_user_blk_args``, ...); guest RAM is put
    in a shared memfd (``-M q35,memory-backend=mem``) when an argument mentions vhost-user or
    ``shared_memory`` is true. ``initrd`` is "initrd", "fio" (with fio) or a path; memory defaults
    to 256 MiB, 512 with "fio". The kernel is the
    kit's vmlinux (QEMU boots its PVH entry: no decompression under TCG, about 6 s faster than the
    bzImage) unless ``kernel`` names another. ``on_line`` sees
    every serial line as it arrives. QEMU is killed after ``timeout`` seconds (then ``timed_out``).
    ``accel="kvm"`` (with ``-cpu host``) is for the KVM lab, where /dev/kvm is kvm_amd.
    ``qemu`` is the program, a command prefix or a QemuFrontend (QEMU 10 in Debian 13's root: the
    kit is made visible to it, and ``visible`` names the other host paths the arguments use).
    """
    kit = kit or guestkit()
    label = ""
    if isinstance(qemu, QemuFrontend):
        label = str(qemu)
        qemu = qemu.argv([kit.dir, *visible])
    cmd = qemu_command(extra_args, workloads, params, kit=kit, memory_mib=memory_mib, cpus=cpus,
                       initrd=initrd, kernel=kernel, shared_memory=shared_memory, append=append, accel=accel,
                       qemu=qemu)
    log, rc, timed_out, elapsed = _run_logged(cmd, timeout, on_line)
    init, results, done = parse_results(log)
    return GuestResult(cmd, log, rc, timed_out, elapsed, init, results, done, label)


class Qmp:
    """A small QMP client on a Unix socket (QEMU started with ``-qmp unix:PATH,server=on,wait=off``).

    ``execute`` sends one command and returns its ``return`` value (events in between are kept in
    ``events``); a QMP error raises :class:`QmpError` with QEMU's description.
    """

    def __init__(self, path: os.PathLike[str] | str, timeout: float = 30) -> None:
        import json
        import socket

        self._json = json
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self._file = self.sock.makefile("rb")
        self.events: list[dict] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP: QEMU closed the monitor")
        return self._json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(self._json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error."""


# ---------------------------------------------------------------------------------------------
# the KVM lab


@dataclasses.dataclass
class LabResult:
    """One run of a script in the KVM lab."""

    command: list[str]
    output: str  # the script's stdout and stderr (the lab's ttyS1)
    returncode: int | None  # the script's exit code; None when it never finished
    console: str  # the L2 console (kernel messages, VDMLAB lines)
    timed_out: bool
    elapsed_s: float
    init: dict[str, str] | None  # VDMLAB INIT keys: kernel, cpus, svm, npt, kvm_amd, devkvm, uptime_s
    start_uptime_s: float | None  # L2 uptime when the script started
    end_uptime_s: float | None  # L2 uptime when it ended
    stalled: str | None = None  # why the run was ended early: L2 stuck (labwatch.Heartbeat)
    vcpus: str = ""  # QEMU's "info registers -a" taken when L2 stalled
    earlier_stalls: list[str] = dataclasses.field(default_factory=list)  # attempts booted again

    def describe(self, lines: int = 60) -> str:
        if self.stalled:
            how = f"L2 stalled ({self.stalled})"
        else:
            how = "timed out" if self.timed_out else f"script exit code {self.returncode}"
        text = f"KVM lab: {how} after {self.elapsed_s:.1f} s\n"
        for i, why in enumerate(self.earlier_stalls, 1):
            text += f"(attempt {i} had stalled too: {why})\n"
        console = "\n".join(ln for ln in self.console.splitlines() if not ln.startswith(labwatch.HB_PREFIX))
        beats = [ln for ln in self.console.splitlines() if ln.startswith(labwatch.HB_PREFIX)]
        text += (f"--- last {lines} lines of the script's output ---\n{_tail(self.output, lines)}\n"
                 f"--- last {lines} lines of the L2 console (heartbeats left out) ---\n"
                 f"{_tail(console, lines)}")
        if beats:
            text += "\n--- last L2 heartbeats ---\n" + "\n".join(beats[-4:])
        if self.vcpus:
            text += "\n--- L2 vCPUs when it stalled (QEMU info registers -a) ---\n" + self.vcpus
        return text

    def assert_ok(self) -> None:
        """The script ran and exited 0."""
        if self.returncode != 0:
            raise AssertionError(self.describe())


def _lab_wrapper(script_text: str, workdir: Path, cwd: str, env: Mapping[str, str] | None) -> Path:
    """Write the user's script and a wrapper that sets a usable environment inside the chroot."""
    user = workdir / "script"
    user.write_text(script_text)
    user.chmod(0o755)
    pybin = os.path.dirname(os.path.realpath(sys.executable))
    path = ":".join([pybin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    environment = {
        "PATH": path,
        "HOME": str(Path.home()),
        "TMPDIR": "/mnt/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        # stdout is a serial tty (so output streams line by line); keep tools from colouring it
        "TERM": "dumb",
        "NO_COLOR": "1",
        "PY_COLORS": "0",
        "VDM_IN_KVM_LAB": "1",
        "VDM_GUESTKIT_DIR": str(kit_dir()),
    }
    environment.update(env or {})
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in environment.items() if ENV_RE.match(k)]
    lines.append(f"cd {shlex.quote(cwd)} 2>/dev/null || cd /")
    runner = shlex.quote(str(user)) if script_text.startswith("#!") else f"/bin/sh {shlex.quote(str(user))}"
    lines.append(f"exec {runner}")
    wrapper = workdir / "run"
    wrapper.write_text("\n".join(lines) + "\n")
    wrapper.chmod(0o755)
    return wrapper


def _tail_file(path: Path, stop: threading.Event, sink: Callable[[str], None]) -> None:
    """Copy what is appended to path to sink until stop is set (then copy the rest)."""
    pos = 0
    while True:
        last = stop.is_set()
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            pos += len(data)
            sink(data.decode("utf-8", "replace"))
        if last:
            return
        stop.wait(0.2)


def lab_command(wrapper: Path, output_file: Path, *, kit: GuestKit, memory_mib: int = 2048, cpus: int = 2,
                outdir: Path | None = None, monitor: Path | None = None, qemu: str = QEMU) -> list[str]:
    """The qemu-system-x86_64 command line of the lab (L2); ``monitor``: an HMP unix socket."""
    python = os.path.realpath(sys.executable)  # the interpreter l2-init.sh runs kvmhold.py with
    append = f"console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off vdmlab.cmd={wrapper}"
    if VALUE_RE.match(python) and "," not in python:
        append += f" vdmlab.py={python}"
    for p in (wrapper, output_file, *([monitor] if monitor else [])):
        if not VALUE_RE.match(str(p)) or "," in str(p):
            raise ValueError(f"path {p} cannot go on a QEMU or kernel command line")
    cmd = [qemu, "-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus),
           "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-kernel", str(kit.vmlinux), "-initrd", str(kit.lab_initrd),
           "-serial", "stdio", "-serial", f"file:{output_file}",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]
    if outdir is not None:
        if "," in str(outdir):
            raise ValueError(f"outdir {outdir} must not contain a comma")
        cmd += ["-virtfs", f"local,path={outdir},mount_tag=labout,security_model=none,multidevs=remap"]
        append += " vdmlab.out=1"
    if monitor is not None:
        cmd += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    return [*cmd, "-append", append]


def run_in_kvm_lab(
    script_text: str,
    timeout: float = 600,
    *,
    kit: GuestKit | None = None,
    memory_mib: int = 2048,
    cpus: int = 2,
    outdir: os.PathLike[str] | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    echo: Callable[[str], None] | None = None,
    qemu: str = QEMU,
    stall_retries: int = 1,
) -> LabResult:
    """Boot the KVM lab and run ``script_text`` in the host's root (chroot, read-only 9p).

    The script runs with /bin/sh (or its own ``#!`` interpreter) as root, in ``cwd`` (default: the
    current directory), with this Python's bin directory first in PATH, ``TMPDIR=/mnt/tmp`` and
    ``VDM_IN_KVM_LAB=1``; /mnt is a writable tmpfs, /dev/kvm is kvm_amd. ``outdir`` (a host
    folder) appears read-write at /mnt/out. ``echo`` receives the script's output as it comes.

    When L2 itself gets stuck (``labwatch.Heartbeat``: a CPU that takes no more interrupts, or no
    heartbeat at all) the run is ended at once, QEMU's view of the vCPUs is kept in the result,
    and the lab is booted again, up to ``stall_retries`` times; the result lists those stalls.
    A script that fails, or runs past ``timeout`` while L2 is alive, is never run again here.
    """
    kit = kit or guestkit()
    earlier: list[str] = []
    while True:
        r = _lab_attempt(script_text, timeout, kit, memory_mib, cpus, outdir, env, cwd, echo, qemu)
        r.earlier_stalls = list(earlier)
        if r.stalled is None or len(earlier) >= stall_retries:
            return r
        earlier.append(r.stalled)
        print(f"KVM lab: L2 stalled after {r.elapsed_s:.0f} s ({r.stalled}); booting the lab again "
              f"(attempt {len(earlier) + 1} of {stall_retries + 1})", file=sys.stderr, flush=True)


def _lab_attempt(script_text: str, timeout: float, kit: GuestKit, memory_mib: int, cpus: int,
                 outdir: os.PathLike[str] | str | None, env: Mapping[str, str] | None, cwd: str | None,
                 echo: Callable[[str], None] | None, qemu: str) -> LabResult:
    with tempfile.TemporaryDirectory(prefix="vdmlab-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        wrapper = _lab_wrapper(script_text, work, cwd or os.getcwd(), env)
        output_file = work / "output"
        monitor: Path | None = work / "monitor"
        if len(str(monitor)) > 100:  # a unix socket path has room for 107 bytes; go without
            monitor = None
        cmd = lab_command(wrapper, output_file, kit=kit, memory_mib=memory_mib, cpus=cpus,
                          outdir=Path(outdir).resolve() if outdir is not None else None, monitor=monitor,
                          qemu=qemu)
        stop = threading.Event()
        tailer = None
        if echo is not None:
            tailer = threading.Thread(target=_tail_file, args=(output_file, stop, echo), daemon=True)
            tailer.start()
        heartbeat = labwatch.Heartbeat()
        stall: list[str] = []  # [reason, vCPU registers] once L2 is found stuck

        def stuck() -> bool:
            why = heartbeat.stalled()
            if why is not None and not stall:
                regs = labwatch.ask_monitor(str(monitor), "info registers -a") if monitor else ""
                regs = labwatch.vcpu_summary(regs) or regs
                stall[:] = [why, regs]
            return why is not None

        console, _rc, timed_out, elapsed = _run_logged(
            cmd, timeout, heartbeat.on_line, stop=lambda line: line.startswith("VDMLAB RC="), abort=stuck)
        stop.set()
        if tailer is not None:
            tailer.join(5)
        output = output_file.read_text(errors="replace") if output_file.exists() else ""
    init, start, end, returncode = parse_lab_console(console)
    return LabResult(cmd, output, returncode, console, timed_out and returncode is None, elapsed, init,
                     start, end, stalled=stall[0] if stall else None, vcpus=stall[1] if stall else "")


def parse_lab_console(console: str) -> tuple[dict[str, str] | None, float | None, float | None, int | None]:
    """(VDMLAB INIT keys, script start uptime, script end uptime, script exit code) from L2's console.

    Missing or garbled values come back as None.
    """
    init = None
    start = end = None
    returncode = None
    for raw in console.splitlines():
        line = raw.strip("\r")
        if line.startswith("VDMLAB INIT "):
            init = parse_keyvalues(line[len("VDMLAB INIT ") :])
        elif line.startswith("VDMLAB START "):
            start = _number(parse_keyvalues(line).get("uptime_s"), float)
        elif line.startswith("VDMLAB RC="):
            kv = parse_keyvalues(line[len("VDMLAB ") :])
            returncode = _number(kv.get("RC"), int)
            end = _number(kv.get("uptime_s"), float)
    return init, start, end, returncode


def _number(text: str | None, kind: Callable[[str], T]) -> T | None:
    """int/float of a console value, None when it is missing or garbled."""
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# command line


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("kit", help="build the guest kit (cached) and print its paths")
    lab = sub.add_parser("lab", help="run a shell command in the KVM lab and print its output")
    lab.add_argument("--timeout", type=float, default=900)
    lab.add_argument("--out", help="host folder shared read-write at /mnt/out")
    lab.add_argument("--memory", type=int, default=2048, help="L2 memory in MiB")
    lab.add_argument("--cpus", type=int, default=2)
    lab.add_argument("-v", "--verbose", action="store_true", help="print the L2 console too")
    lab.add_argument("command", nargs="+", help="shell command (joined with spaces)")
    q = sub.add_parser("qemu", help="boot the kit under QEMU TCG with workloads and print the log")
    q.add_argument("workloads", help="comma-separated workloads, e.g. boot,smp")
    q.add_argument("-p", "--param", action="append", default=[], help="KEY=VALUE guest parameter")
    q.add_argument("--timeout", type=float, default=120)
    q.add_argument("--fio", action="store_true", help="use the initrd with fio")
    q.add_argument("--memory", type=int, help="guest memory in MiB (default 256, 512 with --fio)")
    q.add_argument("--cpus", type=int, default=1)
    q.add_argument("--accel", default="tcg", help="tcg (default) or kvm (in the KVM lab)")
    q.epilog = "Extra QEMU arguments follow a lone --."
    args = list(sys.argv[1:] if argv is None else argv)
    qemu_extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, qemu_extra = args[:i], args[i + 1 :]
    a = ap.parse_args(args)
    try:
        kit = guestkit()
    except GuestKitError as e:
        print(e, file=sys.stderr)
        return 2
    if a.what == "kit":
        for f in dataclasses.fields(kit):
            print(f"{f.name}: {getattr(kit, f.name)}")
        return 0
    if a.what == "lab":
        def echo(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        r = run_in_kvm_lab(" ".join(a.command) + "\n", a.timeout, kit=kit, memory_mib=a.memory, cpus=a.cpus,
                           outdir=a.out, echo=echo)
        if a.verbose or r.returncode is None:
            print(r.console, file=sys.stderr)
        l2_init = r.init.get("uptime_s") if r.init else None
        print(f"[kvmlab: rc={r.returncode} wall={r.elapsed_s:.1f}s l2_init={l2_init}"
              f" script_start={r.start_uptime_s} script_end={r.end_uptime_s}]", file=sys.stderr)
        return 255 if r.returncode is None else r.returncode
    params = dict(p.split("=", 1) for p in a.param)
    r = run_qemu(qemu_extra, a.workloads.split(","), params, a.timeout, kit=kit,
                 initrd="fio" if a.fio else "initrd", memory_mib=a.memory, cpus=a.cpus, on_line=print,
                 accel=a.accel)
    print(f"[qemu: rc={r.returncode} timed_out={r.timed_out} wall={r.elapsed_s:.1f}s]", file=sys.stderr)
    return 0 if r.results and all(x.ok for x in r.results) else 1


if __name__ == "__main__":
    sys.exit(_main())
