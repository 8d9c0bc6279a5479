"""In-process endpoints: :class:`MemoryBackend` (tests, embedding) and :class:`NullBackend`."""

from __future__ import annotations

import logging
import threading
from typing import Optional

from .base import DEFAULT_INPUT_BUFFER, ConsoleBackend

__all__ = ['MemoryBackend', 'NullBackend']

log = logging.getLogger(__name__)


class MemoryBackend(ConsoleBackend):
    """Output collected in :attr:`output`; input given with :meth:`inject` (tests, embedding).

    :meth:`inject` stands for the source: it always succeeds, so it does not exercise flow
    control (the real backends do); :meth:`wait_output` waits for output to arrive.
    """

    kind = "memory"

    def __init__(self, input_buffer: int = DEFAULT_INPUT_BUFFER) -> None:
        super().__init__(input_buffer)
        self.output = bytearray()
        self._out_cond = threading.Condition()

    def inject(self, data: bytes) -> None:
        """Bytes typed by the user: buffered and announced to the consumer."""
        self._deliver(bytes(data))

    def window_size(self) -> Optional[tuple[int, int]]:
        return self.size

    size: Optional[tuple[int, int]] = None

    def resize(self, rows: int, cols: int) -> None:
        """Pretend the terminal was resized."""
        self.size = (rows, cols)
        self._notify_resize(rows, cols)

    def _write_out(self, data: bytes) -> None:
        with self._out_cond:
            self.output += data
            self._out_cond.notify_all()

    def take_output(self) -> bytes:
        with self._out_cond:
            data = bytes(self.output)
            self.output.clear()
            return data

    def wait_output(self, n: int, timeout: float = 5.0) -> bytes:
        """Wait until at least ``n`` bytes of output arrived; return (and keep) all of it."""
        with self._out_cond:
            self._out_cond.wait_for(lambda: len(self.output) >= n, timeout)
            return bytes(self.output)


class NullBackend(ConsoleBackend):
    """Output is discarded; there is no input."""

    kind = "null"
