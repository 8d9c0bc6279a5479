"""A new pseudo-terminal per device: output buffered for a writer thread, dropped while nobody is
attached, so a stalled or absent client never stalls the guest.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import tty
from typing import Optional

from .base import DEFAULT_INPUT_BUFFER, ConsoleBackend, write_all
from .terminal import window_size

__all__ = ['PtyBackend']

log = logging.getLogger(__name__)


class PtyBackend(ConsoleBackend):
    """A new pseudo-terminal; connect with ``screen /dev/pts/N`` (the path is printed).

    The slave side is raw (no echo: guest output must not come back as input). vdm does not keep
    the slave open, so it can tell whether anyone is attached: output with nobody attached is
    dropped rather than piling up, and a client may come and go.
    """

    kind = "pty"
    has_input = True
    output_buffer = 64 * 1024

    def __init__(
        self,
        *,
        announce: bool = True,
        write_timeout: float = 1.0,
        input_buffer: int = DEFAULT_INPUT_BUFFER,
    ) -> None:
        super().__init__(input_buffer)
        self.write_timeout = write_timeout
        self.master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.path = os.ttyname(slave)
        finally:
            os.close(slave)
        os.set_blocking(self.master, False)
        os.set_inheritable(self.master, False)
        log.info("console on pty %s", self.path)
        if announce:
            print(f"vdm: console on {self.path}", file=sys.stderr, flush=True)

    @property
    def description(self) -> str:
        return f"pty {self.path}"

    def connected(self) -> bool:
        """Whether some process has the slave side open."""
        p = select.poll()
        p.register(self.master, select.POLLIN)
        for _, ev in p.poll(0):
            if ev & select.POLLHUP:
                return False
        return True

    def window_size(self) -> Optional[tuple[int, int]]:
        return window_size(self.master)

    def _read_source(self, max_bytes: int) -> Optional[bytes]:
        if not self.connected():
            # Nobody attached: the master reads EIO and polls HUP until someone opens the slave.
            self._wait_readable(-1, 0.1)
            return b""
        if not self._wait_readable(self.master):
            return b""
        try:
            return os.read(self.master, max_bytes)
        except OSError as e:
            if e.errno == errno.EIO:  # the client went away between poll and read
                return b""
            raise

    def _accepts_output(self) -> bool:
        return self.connected()

    def _write_out(self, data: bytes) -> None:
        if not self.connected():
            self.dropped_output += len(data)
            return
        done = write_all(self.master, data, self.write_timeout)
        self.dropped_output += len(data) - done

    def _close_source(self) -> None:
        os.close(self.master)
