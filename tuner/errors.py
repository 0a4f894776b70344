"""The one exception type the package raises for anything a user can fix.

Every layer below the CLI raises :class:`TunerError` (never prints, never exits); the CLI turns it into a single
line on stderr and a non-zero exit code in one place (``tuner.cli.app``).
"""

from __future__ import annotations


class TunerError(Exception):
    """A user-facing failure: bad input, a missing file, a plan that cannot fit, a server that would not start.

    ``str(error)`` is the whole message, one line. ``exit_code`` is what the CLI exits with.
    """

    def __init__(self, message: str, *, exit_code: int = 1, hint: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        if self.hint:
            text = f"{text} ({' '.join(self.hint.split())})"
        return text
