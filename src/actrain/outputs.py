"""Output paths checked before the work that fills them: a mistake in ``--out`` is one line
at the start, not a traceback after an hour of evaluation. The checks create nothing."""

from __future__ import annotations

import os
from pathlib import Path

from actrain.errors import UsageError


def writable_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a folder that exists and can be written to, or that can be made: its
    nearest existing ancestor is a folder this process may write in."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists" if existing == path else f"is under {existing}, which exists"
        raise UsageError(f"{flag}: {path} {what} and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot write in {existing} (permission denied)")
    return path


def writable_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file that can be written: not a folder, in a folder :func:`writable_dir`
    accepts, and writable where it exists."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; give a file name")
    writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag}: cannot write {path} (permission denied)")
    return path
