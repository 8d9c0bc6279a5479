"""The transmit queue under concurrency: every head comes back to the driver exactly once.

A Linux guest once logged ``virtio_net virtio0: output.0:id 7 is not a head!``: a used element on
the transmit queue for a head the driver did not have outstanding. vdm.testing's driver refuses
such an element the same way (``collect`` raises), so these tests fail where Linux would.

* many small frames, kicks from several threads at once while the device is busy, the tap pushing
  back so the poller resumes the queue too, EVENT_IDX on and off;
* resets in the middle of all that;
* a kick that passed the device's "activated" check just before a reset, and only reaches the
  queue after the reset cleared the queue pairs.
"""

from __future__ import annotations

import threading
import time

import pytest
from vdm.device import F_EVENT_IDX
from vdm_net.vnet_hdr import HDR_LEN, VnetHdr

from tests.net.fake_tap import FakeTap
from tests.net.frames import BROADCAST, ETH_P_TEST, eth

MAC = bytes.fromhex("020000000001")
TX = 1


def frame(tag: bytes) -> bytes:
    return eth(BROADCAST, MAC, ETH_P_TEST, tag.ljust(60, b"."))


class Reader:
    """The tap's far end, read by a thread that can be paused (so the tap pushes back).

    With ``flap`` it pauses by itself every other ``flap`` seconds.
    """

    def __init__(self, tap: FakeTap, flap: float = 0.0) -> None:
        self.tap = tap
        self.flap = flap
        self.got: list[bytes] = []
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            flapped = self.flap and int((time.monotonic() - t0) / self.flap) % 2
            if self.paused.is_set() or flapped:
                time.sleep(0.002)
                continue
            self.got += [m[HDR_LEN:] for m in self.tap.drain(0)]
            time.sleep(0.0005)

    def stop(self) -> list[bytes]:
        self.paused.clear()
        time.sleep(0.05)
        self._stop.set()
        self._thread.join(5)
        self.got += [m[HDR_LEN:] for m in self.tap.drain(0)]
        return self.got


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
def test_many_small_frames_with_concurrent_kicks_and_back_pressure(fake, event_idx):
    tap, dev, drv = fake(exclude=0 if event_idx else 1 << F_EVENT_IDX, queue_size=64)
    tap.shrink(0)  # a small socket buffer: the tap pushes back after a few dozen frames
    reader = Reader(tap, flap=0.02)  # pauses for 20 ms every 20 ms
    stop = threading.Event()
    errors: list[BaseException] = []

    def kicker() -> None:
        try:
            while not stop.is_set():
                drv.kick(TX)
                time.sleep(0.0002)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    kickers = [threading.Thread(target=kicker, daemon=True) for _ in range(3)]
    for t in kickers:
        t.start()
    sent: list[bytes] = []
    completed = 0
    try:
        deadline = time.monotonic() + 60
        for n in range(3000):
            while not drv.queues[TX].free_desc and time.monotonic() < deadline:
                completed += len(drv.collect(TX))  # raises on a head that is not outstanding
                time.sleep(0.0002)
            tag = b"f%d" % n
            drv.post(TX, [VnetHdr().pack() + frame(tag)])
            sent.append(frame(tag))
            if n % 7 == 0:
                drv.kick(TX)
        drv.kick(TX)
        while completed < len(sent) and time.monotonic() < deadline:
            completed += len(drv.collect(TX))
            time.sleep(0.001)
    finally:
        stop.set()
        for t in kickers:
            t.join(5)
        got = reader.stop()
    assert not errors, errors
    assert completed == len(sent), f"{completed} of {len(sent)} frames came back"
    assert got == sent, "frames lost, duplicated or reordered on the way to the tap"
    assert not drv.needs_reset
    st = dev.stats()
    assert st["tx_packets"] == len(sent) and st["tx_dropped"] == 0
    assert st["tx_tap_full"] > 0, "the tap never pushed back: the test did not test the poller's resumes"
    assert dev.queues[TX].duplicate_completions == 0


def test_resets_in_the_middle_of_transmitting(fake):
    tap, dev, drv = fake(queue_size=32)
    tap.shrink(0)
    reader = Reader(tap)
    stop = threading.Event()

    def kicker() -> None:
        while not stop.is_set():
            drv.kick(TX)
            time.sleep(0.0003)

    t = threading.Thread(target=kicker, daemon=True)
    t.start()
    try:
        for rnd in range(15):
            reader.paused.set() if rnd % 3 == 1 else reader.paused.clear()
            posted = 0
            for n in range(40):
                if not drv.queues[TX].free_desc:
                    drv.collect(TX)
                    if not drv.queues[TX].free_desc:
                        break
                drv.post(TX, [VnetHdr().pack() + frame(b"r%d-%d" % (rnd, n))])
                posted += 1
                if n % 5 == 0:
                    drv.kick(TX)
            drv.collect(TX)  # whatever came back so far (raises on a head not outstanding)
            drv.init()  # reset in the middle: what was in flight is forgotten by both sides
        reader.paused.clear()
        for n in range(20):  # after all that, the queue works and returns each head once
            drv.post(TX, [VnetHdr().pack() + frame(b"last%d" % n)])
        drv.kick(TX)
        assert len(drv.wait(TX, 20, timeout=10)) == 20
    finally:
        stop.set()
        t.join(5)
        got = reader.stop()
    assert got[-20:] == [frame(b"last%d" % n) for n in range(20)]
    assert not drv.needs_reset
    assert dev.queues[TX].duplicate_completions == 0


def test_a_kick_that_reaches_the_queue_after_a_reset_cleared_it_does_nothing(fake):
    """The kick passed the device's checks before the reset, then lost the CPU until the reset had
    cleared the queue pairs (but not yet the rings): it must not take chains from the old rings,
    nor leave one behind that the device sends after the driver set the queue up again."""
    tap, dev, drv = fake()
    tap.fill(0)  # the tap pushes back: a chain taken now stays held by the pair
    drv.post(TX, [VnetHdr().pack() + frame(b"before the reset")])
    inside, go, kicked = threading.Event(), threading.Event(), threading.Event()
    role = dev._role
    me = []

    def slow_role(index: int):  # the first thing process_queue does
        if threading.current_thread() in me and not go.is_set():
            inside.set()
            go.wait(5)
        return role(index)

    on_reset = dev.on_reset

    def reset_then_let_the_kick_in() -> None:
        on_reset()
        if inside.is_set():
            go.set()
            kicked.wait(5)

    dev._role = slow_role  # type: ignore[method-assign]
    dev.on_reset = reset_then_let_the_kick_in  # type: ignore[method-assign]
    kicker = threading.Thread(target=lambda: (drv.kick(TX), kicked.set()))
    me.append(kicker)
    kicker.start()
    assert inside.wait(5)
    drv.init()  # reset (the kick goes on inside it) and set up again
    kicker.join(5)
    dev._role, dev.on_reset = role, on_reset  # type: ignore[method-assign]
    assert dev.pairs[0].tx_chain is None and not dev.pairs[0].tx_blocked, "the late kick left a chain behind"
    tap.drain(0)
    used = drv.request(TX, [VnetHdr().pack() + frame(b"after the reset")], timeout=5)
    assert used.written == 0
    time.sleep(0.1)
    got = [m[HDR_LEN:] for m in tap.drain(0) if len(m) != 4096]
    assert got == [frame(b"after the reset")], "a frame from before the reset was sent after it"
