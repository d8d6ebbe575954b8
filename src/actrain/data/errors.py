"""Error type for data problems the user can fix (paths, layouts, names)."""

from __future__ import annotations

from actrain.errors import UserError


class DataError(UserError):
    """A one-line, user-facing data problem.

    Raised instead of torchvision's generic RuntimeError so that the CLI can print the message
    without a traceback: it always says what was expected and how to fix it.
    """
