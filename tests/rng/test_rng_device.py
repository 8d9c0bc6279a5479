"""vdm-rng's virtio-rng through vdm.testing's driver: what a guest's virtio_rng sees.

The rate limit is checked on the device's own clock, injected (a FakeClock the test moves), so
nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest
from vdm.transport.mmio import Reg
from vdm_virtio_rng.config import RngConfig
from vdm_virtio_rng.device import MAX_REQUEST, RngDevice


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture
def devices():
    made: list[RngDevice] = []

    def make(config: RngConfig | None = None, **kw) -> RngDevice:
        dev = RngDevice(config, **kw)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.close()


def rng_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_identity_one_queue_no_features(virtio_driver, devices):
    drv = virtio_driver(devices())
    assert drv.reg_read(Reg.DEVICE_ID) == 4
    assert drv.device_features() & 0xFFFFFF == 0  # virtio-rng has no device feature bits
    assert drv.queue_max_size(0) == 256
    assert drv.queue_max_size(1) == 0


def test_fills_buffers_from_urandom(virtio_driver, devices):
    dev = devices()
    drv = virtio_driver(dev)
    drv.init()
    a = drv.request(0, [], [64])
    b = drv.request(0, [], [16, 48])  # two writable buffers: both filled
    assert (a.written, b.written) == (64, 64)
    assert a.data != b.data and len(set(a.data)) > 16
    assert dev.bytes_served == 128


def test_readable_buffers_are_ignored_and_a_huge_buffer_is_filled_in_part(virtio_driver, devices):
    dev = devices()
    drv = virtio_driver(dev, ram_size=8 << 20)
    drv.init()
    assert drv.request(0, [b"ignored"], [32]).written == 32
    assert drv.request(0, [b"only readable"], []).written == 0
    big = drv.request(0, [], [2 * MAX_REQUEST])
    assert big.written == MAX_REQUEST  # the driver reads the used length
    assert big.data[MAX_REQUEST:] == b"\xee" * MAX_REQUEST  # past it: the driver's poison, untouched


def test_file_source_is_read_in_order(virtio_driver, devices, tmp_path):
    src = tmp_path / "pool.bin"
    pool = os.urandom(4096)
    src.write_bytes(pool)
    drv = virtio_driver(devices(RngConfig(source=str(src))))
    drv.init()
    got = b"".join(u.data[: u.written] for u in (drv.request(0, [], [1000]) for _ in range(4)))
    assert got == pool[:4000]


def test_a_source_that_ends_fails_the_device_with_one_line(virtio_driver, devices, tmp_path, caplog):
    src = tmp_path / "short.bin"
    src.write_bytes(b"x" * 100)
    dev = devices(RngConfig(source=str(src)))
    drv = virtio_driver(dev)
    drv.init()
    assert drv.request(0, [], [64]).written == 64
    assert drv.request(0, [], [64]).written == 36  # what is left, not padded
    with caplog.at_level(logging.WARNING):
        drv.submit(0, [], [64])
        drv.submit(0, [], [64])
    assert drv.needs_reset
    (line,) = rng_errors(caplog)
    assert "ended after 100 bytes" in line and str(src) in line
    assert dev.bytes_served == 100


def test_a_source_that_fails_to_read_fails_the_device_with_one_line(virtio_driver, devices, caplog):
    # /proc/self/mem at offset 0 is a real EIO: the page at address 0 is never mapped
    dev = devices(RngConfig(source="/proc/self/mem"))
    drv = virtio_driver(dev)
    drv.init()
    with caplog.at_level(logging.WARNING):
        drv.submit(0, [], [64])
    assert drv.needs_reset
    (line,) = rng_errors(caplog)
    assert "cannot read the source /proc/self/mem" in line and "Input/output error" in line
    drv.init()  # the driver resets it; the device answers again (and fails again on this source)


def test_fifo_and_directory_sources_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO or socket"):
        RngDevice(RngConfig(source=str(fifo)))  # no writer: refused at once, not waited for
    with pytest.raises(ValueError, match="not a character device or regular file"):
        RngDevice(RngConfig(source=str(tmp_path)))
    with pytest.raises(FileNotFoundError):
        RngDevice(RngConfig(source=str(tmp_path / "missing")))


def quota_windows(drv, clock, windows: int, step: float) -> list[int]:
    """Bytes served in each of ``windows`` steps of ``step`` seconds (the test kicks each time)."""
    served = []
    for _ in range(windows):
        drv.kick(0)
        served.append(sum(u.written for u in drv.collect(0)))
        clock.advance(step)
    return served


def test_rate_limit_gives_the_quota_per_window_and_holds_the_rest(virtio_driver, devices):
    clock = FakeClock()
    dev = devices(RngConfig(rate=256, period=1000), clock=clock)  # 256 bytes per second
    drv = virtio_driver(dev)
    drv.init()
    for _ in range(30):
        drv.post(0, [], [64])  # 1920 bytes asked for at once
    # half-second steps: a window is two steps; only its first step finds quota
    served = quota_windows(drv, clock, 10, 0.5)
    assert served == [256, 0] * 5
    assert dev.waiting  # the rest waits for the next window, in the guest's ring
    assert dev.bytes_served == 5 * 256


def test_rate_limit_answers_requests_whole_in_a_later_window(virtio_driver, devices):
    """A window's rest too small for a request does not cut it: Linux's driver stalls on a cut
    answer (seen with 6.1). The request is answered whole when the next window begins."""
    clock = FakeClock()
    dev = devices(RngConfig(rate=1000, period=100), clock=clock)  # 100 bytes per 100 ms
    drv = virtio_driver(dev)
    drv.init()
    for _ in range(5):
        drv.post(0, [], [64])
    written: list[list[int]] = []
    for _ in range(6):
        drv.kick(0)
        written.append([u.written for u in drv.collect(0)])
        clock.advance(0.1)
    assert written == [[64]] * 5 + [[]]  # one whole request per window, never 36 bytes


def test_rate_limit_smaller_than_a_request_gives_the_whole_quota(virtio_driver, devices):
    clock = FakeClock()
    dev = devices(RngConfig(rate=1000, period=100), clock=clock)  # 100 bytes per 100 ms
    drv = virtio_driver(dev)
    drv.init()
    for _ in range(3):
        drv.post(0, [], [256])  # more than a window gives: the whole window, never 0 bytes
    written = []
    for _ in range(4):
        drv.kick(0)
        written += [u.written for u in drv.collect(0)]
        clock.advance(0.1)
    assert written == [100, 100, 100]


def test_waker_serves_held_requests_without_another_kick(virtio_driver, devices):
    dev = devices(RngConfig(rate=6400, period=20))  # the real clock: 128 bytes per 20 ms
    drv = virtio_driver(dev)
    drv.init()
    for _ in range(10):
        drv.post(0, [], [128])
    drv.kick(0)  # one kick; the waker brings the rest, one window at a time
    used = drv.wait(0, 10, timeout=30)
    assert [u.written for u in used] == [128] * 10
    assert not dev.waiting


def test_reset_forgets_the_wait_but_not_the_quota(virtio_driver, devices):
    clock = FakeClock()
    dev = devices(RngConfig(rate=64, period=1000), clock=clock)
    drv = virtio_driver(dev)
    drv.init()
    drv.post(0, [], [64])
    drv.post(0, [], [64])
    drv.kick(0)
    assert [u.written for u in drv.collect(0)] == [64]
    assert dev.waiting
    drv.init()  # the driver resets the device (status 0) and sets it up again
    assert not dev.waiting
    drv.submit(0, [], [64])
    assert drv.collect(0) == []  # a reset does not renew the window's quota
    clock.advance(1.0)
    drv.kick(0)
    assert [u.written for u in drv.collect(0)] == [64]


def test_close_ends_the_waker_thread(virtio_driver, devices):
    clock = FakeClock()
    dev = devices(RngConfig(rate=64, period=1000), clock=clock)
    drv = virtio_driver(dev)
    drv.init()
    drv.post(0, [], [64])
    drv.post(0, [], [64])
    drv.kick(0)
    assert [u.written for u in drv.collect(0)] == [64]
    assert dev.waiting and dev.waker_running
    dev.close()
    assert not dev.waker_running and not dev.waiting
    dev.close()  # twice is fine
    clock.advance(10)
    drv.kick(0)  # a kick after close fails the device rather than reading a closed fd
    assert drv.collect(0) == [] and drv.needs_reset
