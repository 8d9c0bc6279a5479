"""Errors meant for the person at the keyboard."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user (a wrong flag, a missing kernel, a corrupt image).

    The message is one line that says what is wrong and how to fix it; ``vdm`` prints it as
    ``vdm: <message>`` and exits with status 1 (or ``exit_status``).
    """

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status
