"""vdm.testing's drivers as a plugin author calls them: config writes by keyword, MSI-X vectors,
and a clear error when a queue is looked at before the transport was walked."""

from __future__ import annotations

import pytest
from vdm.device import VirtioDevice
from vdm.testing import VirtioPciTestDriver, VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.virtqueue import Virtqueue


class ConfigDevice(VirtioDevice):
    """Eight bytes of config space; the driver's writes land there."""

    device_id = 0x7E
    name = "cfg"
    queue_max_sizes = (8,)

    def __init__(self) -> None:
        super().__init__()
        self.cfg = bytearray(8)
        self.writes: list[tuple[int, bytes]] = []

    def config_space(self) -> bytes:
        return bytes(self.cfg)

    def write_config(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))
        self.cfg[offset : offset + len(data)] = data

    def process_queue(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push(chain, 0)
        self.signal_used(queue)


@pytest.mark.parametrize("driver", [VirtioTestDriver, VirtioPciTestDriver])
def test_config_write_takes_keywords_in_config_reads_order(driver):
    drv = driver(ConfigDevice(), ram_size=1 << 20)
    drv.init()
    drv.config_write(2, size=2, value=0xBEEF)  # the keyword form, as config_read(offset, size)
    drv.config_write(4, 0x11223344, 4)  # the positional order of plugin API 1 still works
    assert drv.device.writes == [(2, b"\xef\xbe"), (4, b"\x44\x33\x22\x11")]
    assert drv.config_read(2, 2) == 0xBEEF and drv.config_read(4, 4) == 0x11223344


def test_vectors_signalled_names_the_queues_msix_vector():
    drv = VirtioPciTestDriver(EchoDevice(), ram_size=1 << 20)
    drv.init()
    assert drv.vectors_signalled() == []
    drv.request(0, out=[b"ping"], in_lens=[4])
    assert drv.vectors_signalled() == [1]  # queue 0 is on vector 1; config changes on vector 0


@pytest.mark.parametrize("driver", [VirtioTestDriver, VirtioPciTestDriver])
def test_queue_max_size_after_check_transport(driver):
    drv = driver(EchoDevice(queue_size=32), ram_size=1 << 20)
    drv.check_transport()
    assert drv.queue_max_size(0) == 32
    assert drv.queue_max_size(1) == 0  # no such queue


def test_queue_max_size_before_check_transport_says_what_to_call():
    drv = VirtioPciTestDriver(EchoDevice(), ram_size=1 << 20)
    with pytest.raises(RuntimeError, match=r"check_transport\(\)"):
        drv.queue_max_size(0)
