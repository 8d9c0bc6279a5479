"""What the real-guest rng tests share: an rng device served by ``vdm vhost-user`` from the test's
tmp directory, and a QEMU TCG guest (the kit's ``rng`` workload) reading ``/dev/hwrng`` from it.

``tests/rng/test_rng_realguest.py`` serves vdm-rng (the plugin), ``tests/examples/
test_rng_realguest.py`` the example plugin from a venv it is installed in; what the guest must see
is the same: the kernel's hwrng is the virtio device, the bytes asked for arrive, they look random,
and the backend is still serving afterwards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import vdm_lab

from tests.core.installed import clean_env


@contextlib.contextmanager
def vhost_user_backend(
    python: str | Path, device: Sequence[str], tmp_path: Path
) -> Iterator[vdm_lab.VhostUserBackend]:
    """``python -m vdm.cli.main vhost-user -s SOCKET *device`` (socket in ``tmp_path``, no VDM_*
    settings), serving once entered, stopped on exit; yields the :class:`vdm_lab.VhostUserBackend`."""
    with vdm_lab.VhostUserBackend(
        tmp_path / "rng.sock", *device, python=python, env=clean_env(), start_timeout=30
    ) as backend:
        yield backend


def guest_reads_hwrng(
    kit: vdm_lab.GuestKit,
    fe: vdm_lab.QemuFrontend,
    backend: vdm_lab.VhostUserBackend,
    nbytes: int,
) -> None:
    """Boot the kit under ``fe`` with a vhost-user-rng-pci device on the backend's socket; the
    guest reads ``nbytes`` from /dev/hwrng. Asserts what the guest and the backend's output show."""
    sock = Path(backend.socket_path)
    r = vdm_lab.run_qemu(
        vdm_lab.vhost_user_device_args("vhost-user-rng-pci", sock),
        ["rng"],
        {"rngbytes": nbytes},
        timeout=300,
        kit=kit,
        qemu=fe,
        visible=[sock.parent],
    )
    assert not r.timed_out, f"{fe}\n{r.log[-3000:]}"
    r.assert_ok("rng")
    res = r["rng"]
    assert res["rng"] == "virtio_rng.0", f"{fe}: {res.line}"  # the kernel's hwrng is vdm's device
    assert res["bytes"] == str(nbytes), f"{fe}: {res.line}"
    assert int(res["distinct"]) > 200, f"{fe}: {res.line}"  # 4 KiB of random bytes use nearly all 256 values
    assert backend.alive, f"{fe}\n{backend.output}"  # the backend is still serving
    text = backend.output
    assert "serving rng on" in text and "ERROR" not in text, text
