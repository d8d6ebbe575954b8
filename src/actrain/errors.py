"""Exception types shared by the package, importable without torch.

Every error a user can fix derives from :class:`UserError`; the CLI prints its message as one
line and exits with code 2.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: a flag, a file, a folder. One line, exit code 2."""


class ConfigError(UserError):
    """A bad flag or config-file value."""


class CheckpointError(UserError):
    """A missing, truncated, unsafe or mismatched model file."""


class UsageError(UserError):
    """A command-line mistake not tied to one config value."""


class TrainingStopped(Exception):
    """The run stopped on purpose (signal, non-finite loss, unwritable disk); exit quietly."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT, checkpoint written, resume later
