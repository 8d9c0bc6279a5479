"""vdm.session: the one stop signal and device set of ``vdm run``, ``dm-only`` and ``vhost-user``.

Signals here are real: sent to this process (``os.kill``), to one of its threads
(``signal.pthread_kill``: the case where Python's own handler would not wake a main thread that
waits), or to a child process from outside, twice, as coreutils ``timeout`` does. Waits that must
end have a generous timeout only so that a broken session fails the test instead of hanging it;
no assertion is about time.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType
from vdm.session import DeviceSet, StopSignal

#: how long a wait may take before the test calls it stuck (never reached when the session works)
STUCK = 30.0


@pytest.fixture(autouse=True)
def _handlers_restored():
    """Every test leaves SIGTERM/SIGINT/SIGUSR1 and the wakeup fd as it found them."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    after = {s: signal.getsignal(s) for s in before}
    assert after == before
    now = signal.set_wakeup_fd(wakeup)
    assert now == wakeup


class _Busy(threading.Thread):
    """A thread blocked in a wait, to which a signal can be delivered."""

    def __init__(self) -> None:
        super().__init__(name="busy", daemon=True)
        self.go = threading.Event()
        self.started_waiting = threading.Event()

    def run(self) -> None:
        self.started_waiting.set()
        self.go.wait(STUCK)

    def __enter__(self) -> _Busy:
        self.start()
        assert self.started_waiting.wait(STUCK)
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.join(STUCK)


class _Watchdog:
    """Stops the session after STUCK seconds with a reason of its own, so that a wait nothing
    woke ends the test (and fails it: stopped_by is not the signal) instead of hanging it."""

    REASON = "nothing woke the wait"

    def __init__(self, stop: StopSignal) -> None:
        self.timer = threading.Timer(STUCK, stop.stop, (self.REASON,))

    def __enter__(self) -> _Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


# ---- StopSignal -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_a_signal_to_the_process_ends_the_wait(sig: int, name: str) -> None:
    with StopSignal() as stop:
        assert not stop.stopped
        os.kill(os.getpid(), sig)  # Ctrl-C raises no KeyboardInterrupt: it is a stop like SIGTERM
        assert stop.wait(timeout=STUCK) is True
        assert stop.stopped_by == name


def test_a_signal_delivered_to_another_thread_wakes_the_main_threads_wait() -> None:
    """The kernel may hand a process's signal to any thread (a vCPU, a device's loop); Python runs
    its handler in the main thread only once that thread wakes up by itself."""
    with StopSignal() as stop, _Busy() as busy, _Watchdog(stop):
        timer = threading.Timer(0.2, signal.pthread_kill, (busy.ident, signal.SIGTERM))
        timer.start()
        try:
            assert stop.wait() is True
        finally:
            timer.cancel()
        assert stop.stopped_by == "SIGTERM", "the main thread slept through SIGTERM"


def test_a_loop_of_its_own_sees_the_stop_on_fileno() -> None:
    """dm-only's IOREQ loop polls fileno(): readable once stopped, whichever thread got the signal."""
    import select

    with StopSignal() as stop, _Busy() as busy:
        assert select.select([stop.fileno()], [], [], 0)[0] == []
        signal.pthread_kill(busy.ident, signal.SIGINT)
        assert select.select([stop.fileno()], [], [], STUCK)[0] == [stop.fileno()]
        assert stop.stopped_by == "SIGINT"


def test_a_second_sigterm_during_shutdown_is_ignored() -> None:
    """coreutils ``timeout`` signals vdm and then its process group; the second SIGTERM used to
    interrupt ``vdm run``'s clean stop with a traceback."""
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(timeout=STUCK)
        os.kill(os.getpid(), signal.SIGTERM)  # while the command closes its devices
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.stopped_by == "SIGTERM"  # the first one wins; nothing raised
    # the previous handlers are back (the autouse fixture checks they are the same objects)


def test_sigusr1_while_waiting_runs_its_handler_and_the_wait_goes_on() -> None:
    """``kill -USR1`` (vdm's stack dump) must not stop the session, and its Python handler must
    run while the main thread waits, even when the signal lands on another thread."""
    seen: list[str] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(threading.current_thread().name))
    try:
        with StopSignal() as stop, _Busy() as busy, _Watchdog(stop):
            signal.pthread_kill(busy.ident, signal.SIGUSR1)
            assert stop.wait(until=lambda: bool(seen)) is False, stop.stopped_by
            assert seen == ["MainThread"] and not stop.stopped
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_wake_rechecks_the_condition_and_fds_end_the_wait() -> None:
    done: list[int] = []
    with StopSignal() as stop:

        def finish() -> None:
            done.append(1)
            stop.wake()

        threading.Timer(0.1, finish).start()
        assert stop.wait(until=lambda: bool(done), timeout=STUCK) is False
        r, w = os.pipe()
        try:
            threading.Timer(0.1, os.write, (w, b"x")).start()
            assert stop.wait(fds=[r], timeout=STUCK) is False
            assert os.read(r, 1) == b"x"
        finally:
            os.close(r)
            os.close(w)
        assert stop.wait(timeout=0.01) is False and not stop.stopped


def test_stop_from_any_thread_and_only_the_first_reason_counts() -> None:
    with StopSignal() as stop:
        threading.Timer(0.1, stop.stop, ("the VM exited",)).start()
        assert stop.wait(timeout=STUCK) is True
        stop.stop("later")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stopped_by == "the VM exited"


def test_outside_the_main_thread_no_handler_is_installed() -> None:
    out: dict[str, Any] = {}

    def embedded() -> None:
        with StopSignal() as stop:
            out["handler"] = signal.getsignal(signal.SIGTERM)
            threading.Timer(0.1, stop.stop, ("embedder",)).start()
            out["stopped"] = stop.wait(timeout=STUCK)
            out["by"] = stop.stopped_by

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=embedded)
    t.start()
    t.join(STUCK)
    assert out == {"handler": before, "stopped": True, "by": "embedder"}


def test_a_process_signalled_twice_from_outside_stops_cleanly(tmp_path) -> None:
    """As ``timeout`` does it: SIGTERM to vdm, then to its process group, while a device closes."""
    script = tmp_path / "cmd.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from vdm.session import DeviceSet, StopSignal

            class Slow:
                name = "slow"
                def close(self):
                    print("closing", flush=True)
                    time.sleep(0.5)  # the second SIGTERM arrives now
                    print("closed", flush=True)

            with StopSignal() as stop, DeviceSet() as devices:
                devices.devices.append(Slow())
                print("ready", flush=True)
                stop.wait()
            print("stopped by", stop.stopped_by, "ignored", stop.ignored, flush=True)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.stdout.readline() == "closing\n"
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=STUCK)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.splitlines() == ["closed", "stopped by SIGTERM ignored 1"]


# ---- DeviceSet --------------------------------------------------------------------------------------


@dataclass
class Cfg:
    name: str
    fail_close: bool = False
    fail_create: bool = False


class Dev:
    def __init__(self, cfg: Cfg, log: list[str]) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.log = log

    def close(self) -> None:
        self.log.append(f"close {self.name}")
        if self.cfg.fail_close:
            raise OSError(5, "I/O error")


def _dtype(log: list[str]) -> DeviceType:
    def create(cfg: Cfg, ctx: DeviceContext) -> Dev:
        if cfg.fail_create:
            raise FileNotFoundError(2, "No such file or directory", cfg.name)
        return Dev(cfg, log)

    return DeviceType(name="toy", config=Cfg, create=create, cli_flag="--toy")


def test_close_order_users_devices_then_what_they_hold() -> None:
    log: list[str] = []
    dt = _dtype(log)
    with DeviceSet() as devices:
        devices.hold(lambda: log.append("close vm"), "the VM")
        devices.using(lambda: log.append("close transports"), "the transports")
        for name in ("a", "b", "c"):
            devices.create(dt, Cfg(name), DeviceContext())
        devices.using(lambda: log.append("close server"), "the server")
        devices.hold(lambda: log.append("close backend"), "the backend")
        assert [d.name for d in devices.devices] == ["a", "b", "c"]
    assert log == [
        "close server",
        "close transports",
        "close c",
        "close b",
        "close a",
        "close backend",
        "close vm",
    ]
    devices.close()  # once only
    assert len(log) == 7


def test_a_close_that_fails_is_one_log_line_and_the_others_still_close(caplog) -> None:
    log: list[str] = []
    dt = _dtype(log)

    def broken_server() -> None:
        raise RuntimeError("socket gone")

    caplog.set_level(logging.WARNING, logger="vdm.session")
    with DeviceSet() as devices:
        devices.hold(lambda: log.append("close vm"), "the VM")
        devices.using(broken_server, "the server")
        for name, fail in (("a", False), ("b", True), ("c", False)):
            devices.create(dt, Cfg(name, fail_close=fail), DeviceContext())
    assert log == ["close c", "close b", "close a", "close vm"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "closing the server failed: RuntimeError: socket gone",
        "closing b failed: OSError: [Errno 5] I/O error",
    ]


def test_a_failed_create_is_one_user_error_and_what_was_open_is_closed() -> None:
    log: list[str] = []
    dt = _dtype(log)
    with pytest.raises(UserError) as e:
        with DeviceSet() as devices:
            devices.create(dt, Cfg("a"), DeviceContext())
            devices.create(dt, Cfg("missing.img", fail_create=True), DeviceContext())
    assert str(e.value) == "--toy: [Errno 2] No such file or directory: 'missing.img'"
    assert [d.name for d in devices.devices] == ["a"]
    assert log == ["close a"]


def test_ready_drops_privileges_once(tmp_path) -> None:
    """In a child process started as root: ``ready("nobody")`` changes user, a second call is refused."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    script = tmp_path / "drop.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from vdm.session import DeviceSet

            with DeviceSet() as devices:
                devices.ready(None)
                print("after None:", os.getuid(), devices.user)
                devices.ready("nobody")
                print("after nobody:", os.getresuid(), os.getresgid(), os.getgroups())
                try:
                    devices.ready("nobody")
                except RuntimeError as e:
                    print("again:", e)
            """
        )
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=STUCK)
    assert r.returncode == 0, r.stderr
    uid, gid = nobody.pw_uid, nobody.pw_gid
    assert r.stdout.splitlines() == [
        "after None: 0 None",
        f"after nobody: {(uid, uid, uid)} {(gid, gid, gid)} []",
        "again: privileges already dropped to nobody",
    ]


def test_ready_as_another_user_without_root_says_so() -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: the change would succeed (see the test above)")
    with DeviceSet() as devices, pytest.raises(UserError, match="must be started as root"):
        devices.ready("0")
