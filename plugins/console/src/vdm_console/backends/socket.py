"""A unix-socket server endpoint: one client at a time, output buffered and dropped while no
client is connected (or the client stopped reading).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from typing import Optional

from vdm.errors import UserError

from .base import DEFAULT_INPUT_BUFFER, ConsoleBackend

__all__ = ['SocketBackend']

log = logging.getLogger(__name__)


class SocketBackend(ConsoleBackend):
    """A unix socket server: one client at a time; when it leaves, the next one is accepted.

    A stale socket file at ``path`` is replaced; any other file there is an error. Output while no
    client is connected is dropped.
    """

    kind = "socket"
    has_input = True
    output_buffer = 64 * 1024

    def __init__(
        self, path: str, *, write_timeout: float = 1.0, input_buffer: int = DEFAULT_INPUT_BUFFER
    ) -> None:
        super().__init__(input_buffer)
        self.path = path
        self.write_timeout = write_timeout
        self._client: Optional[socket.socket] = None
        self._client_lock = threading.Lock()
        self.clients_served = 0
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"console socket {path}: {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise UserError(f"console socket {path}: exists and is not a socket")
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            raise UserError(f"console socket {path}: {e.strerror}") from None
        log.info("console on unix socket %s", path)

    @property
    def description(self) -> str:
        return f"socket {self.path}"

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _accepts_output(self) -> bool:
        return self._client is not None

    def _drop_client(self, client: socket.socket) -> None:
        with self._client_lock:
            if self._client is client:
                self._client = None
        try:
            client.close()
        except OSError:
            pass

    def _read_source(self, max_bytes: int) -> Optional[bytes]:
        client = self._client
        if client is None:
            if not self._wait_readable(self._listener.fileno()):
                return b""
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                log.debug("%s: accept failed: %s", self.description, e)
                return b""
            conn.settimeout(self.write_timeout)
            with self._client_lock:
                self._client = conn
            self.clients_served += 1
            log.info("%s: client connected", self.description)
            return b""
        if not self._wait_readable(client.fileno()):
            return b""
        try:
            data = client.recv(max_bytes)
        except (socket.timeout, BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            log.info("%s: client disconnected", self.description)
            self._drop_client(client)
        return data

    def _write_out(self, data: bytes) -> None:
        with self._client_lock:
            client = self._client
            if client is None:
                self.dropped_output += len(data)
                return
            try:
                client.sendall(data)
            except socket.timeout:
                self.dropped_output += len(data)  # the client stopped reading
            except OSError:
                self.dropped_output += len(data)  # it went away; the input thread notices

    def _close_source(self) -> None:
        client = self._client
        if client is not None:
            self._drop_client(client)
        self._listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass
