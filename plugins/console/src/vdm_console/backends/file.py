"""The log-file endpoint: guest output appended to a file, written synchronously and fully."""

from __future__ import annotations

import logging
import os

from vdm.errors import UserError

from .base import DEFAULT_INPUT_BUFFER, ConsoleBackend, write_all

__all__ = ['FileBackend']

log = logging.getLogger(__name__)


class FileBackend(ConsoleBackend):
    """Guest output is appended to a file (a boot log); there is no input."""

    kind = "file"

    def __init__(self, path: str, input_buffer: int = DEFAULT_INPUT_BUFFER) -> None:
        super().__init__(input_buffer)
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"console log file {path}: {e.strerror}") from None

    @property
    def description(self) -> str:
        return f"file {self.path}"

    def _write_out(self, data: bytes) -> None:
        write_all(self._fd, data, None)

    def _close_source(self) -> None:
        os.close(self._fd)
