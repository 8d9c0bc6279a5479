"""Calling plugin code so that nothing it does escapes: time-bounded, quiet, one line per failure.

Every call into a plugin while loading (its import, its register hooks, an availability check, a
command's ``add_arguments``) goes through :func:`bounded`: it runs in a daemon worker thread with a
time bound and with ``sys.stdout`` sent to stderr, and whatever it raises -- ``SystemExit`` and
``KeyboardInterrupt`` included -- or a call that does not answer in time becomes one printable
line (:func:`describe`, :func:`printable`). The calls share one worker thread, one call at a time
(a thread per call cost ~40 thread starts per ``vdm`` start, seconds in the KVM lab's TCG guest);
a call that does not answer in time keeps that thread, and the next call gets a new one.
:func:`check_availability` turns a check's answer
into None or one reason line; :func:`deprecations_of` records the DeprecationWarnings plugin code
raises on the plugin's :class:`~vdm.plugins.PluginInfo`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

if TYPE_CHECKING:
    from .plugins import PluginInfo

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_REASON",
    "NO_ANSWER",
    "bounded",
    "check_availability",
    "deprecations_of",
    "describe",
    "printable",
]

#: how a call that did not answer in time is reported (the start of its reason)
NO_ANSWER = "did not answer"
#: longest availability reason kept (a reason is one line of ``vdm list-plugins``)
MAX_REASON = 300
#: seconds a plugin's import, register hook or check may take (``VDM_PLUGIN_TIMEOUT`` changes it)
DEFAULT_TIMEOUT = 10.0


def describe(e: BaseException) -> str:
    """``Type: message`` of an exception from a plugin; a ``__str__`` that raises does not escape."""
    try:
        text = printable(str(e))
    except Exception:
        text = "(its message cannot be shown)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def printable(text: str) -> str:
    """``text`` as one line of printable characters (a terminal escape from a plugin shows as ?)."""
    line = "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return "".join(c if c.isprintable() else "?" for c in line)


class _Worker:
    """A daemon thread that runs the calls put in :attr:`jobs`, one at a time, until abandoned."""

    def __init__(self) -> None:
        #: (call, its answer box, set when answered), or None: end the thread
        self.jobs: queue.SimpleQueue[Optional[tuple[Callable[[], Any], dict[str, Any], threading.Event]]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._serve, name="vdm-plugin", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box["value"] = fn()
            except BaseException as e:  # plugin code: everything is its failure
                box["error"] = describe(e)
            finally:
                done.set()


_worker: Optional[_Worker] = None
_worker_lock = threading.Lock()


def _forget_worker() -> None:
    """In a forked child: the parent's worker thread does not exist there."""
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


def _take_worker() -> _Worker:
    """The idle worker (a new one if there is none); the caller owns it until it gives it back."""
    global _worker
    with _worker_lock:
        worker, _worker = _worker, None
    return worker if worker is not None else _Worker()


def _give_back(worker: _Worker) -> None:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = worker
            return
    worker.jobs.put(None)  # two callers at once made two workers: one idle worker is kept


def bounded(fn: Callable[[], Any], timeout: float | None) -> tuple[Any, Optional[str]]:
    """Call plugin code ``fn()`` in a daemon thread: ``(result, None)`` or ``(None, why it failed)``.

    Whatever it raises, BaseException included, is a reason; after ``timeout`` seconds it is
    abandoned (the thread is left behind, a daemon) and the reason says so. Its writes to
    ``sys.stdout`` go to stderr. The caller's KeyboardInterrupt (Ctrl-C) still stops the wait.
    Calls reuse one idle worker thread; a call that did not answer keeps its thread to itself.
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    worker = _take_worker()
    with contextlib.redirect_stdout(sys.stderr):
        worker.jobs.put((fn, box, done))
        answered = done.wait(timeout)
    if not answered:
        return None, f"{NO_ANSWER} within {timeout:g} s (see --plugin-timeout)"
    _give_back(worker)
    if "error" in box:
        return None, box["error"]
    return box.get("value"), None


def check_availability(
    fn: Callable[[], Optional[str]] | None, timeout: float | None = DEFAULT_TIMEOUT
) -> Optional[str]:
    """A plugin's availability check: None (available) or one line saying why not.

    A check that raises, hangs past ``timeout`` or returns something other than None or a string
    is a reason too, never a crash.
    """
    if fn is None:
        return None
    value, why = bounded(fn, timeout)
    if why is not None:
        return f"availability check failed: {why}"
    if value is None:
        return None
    if not isinstance(value, str):
        return f"availability check returned {type(value).__name__}, not None or a reason"
    line = printable(value) or "unavailable (no reason given)"
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


@contextlib.contextmanager
def deprecations_of(info: PluginInfo) -> Iterator[None]:
    """Record the DeprecationWarnings raised while plugin code runs as ``info.deprecations``.

    Other warnings are issued again as they were. (The warnings filter is process-wide: a call
    left running after its time bound reports to whoever runs next; it is a failed plugin anyway.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            text = printable(str(w.message))
            if text and text not in info.deprecations:
                info.deprecations.append(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
