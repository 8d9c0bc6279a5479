"""Fixtures: a vhost-user server in this process serving a real device, and frontends for it."""

from __future__ import annotations

import os
from typing import Callable

import pytest
from vdm.registry import DeviceContext
from vdm_blk.config import BlkConfig
from vdm_blk.plugin import create as create_blk
from vdm_vhost_user.server import VhostUserServer

from tests.vhost_user.frontend import Frontend

DISK_SIZE = 4 << 20


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed real-guest test says which QEMU it ran against, whatever assertion failed."""
    outcome = yield
    report = outcome.get_result()
    fe = getattr(item, "funcargs", {}).get("qemu_frontend")
    if report.failed and fe is not None:
        report.sections.insert(0, ("QEMU under test", str(fe)))


@pytest.fixture
def image(tmp_path) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(os.urandom(64 << 10))
        f.truncate(DISK_SIZE)
    return path


@pytest.fixture
def serve(tmp_path):
    """``serve(device) -> (server, path)``; servers are closed after the test."""
    servers: list[VhostUserServer] = []

    def start(device) -> tuple[VhostUserServer, str]:
        path = str(tmp_path / f"vu{len(servers)}.sock")
        server = VhostUserServer(path, device).start()
        servers.append(server)
        return server, path

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def blk_server(serve, image):
    """A virtio-blk device on a raw image, made the way ``vdm vhost-user --disk`` makes it."""
    device = create_blk(BlkConfig(path=image), DeviceContext(vmm=None))
    server, path = serve(device)
    yield server, path, device
    server.close()
    device.close()


@pytest.fixture
def frontends() -> Callable[..., Frontend]:
    made: list[Frontend] = []

    def connect(path: str, **kw) -> Frontend:
        fe = Frontend(path, **kw)
        made.append(fe)
        return fe

    yield connect
    for fe in made:
        fe.close()
        fe.ram.close()
