"""Output paths checked before the work that fills them: a mistake in ``--out`` is one line
at the start, not a traceback after an hour of evaluation. The checks leave nothing behind."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import IO

from actrain.errors import UsageError


def writable_dir(path: str | Path, flag: str, target: Path | None = None) -> Path:
    """``path`` as a folder that exists, or can be made, and takes new files: its nearest
    existing ancestor is a folder in which a probe file can be made (and is removed;
    ``os.access`` says yes to everything for root, /proc included). ``target``: the file the
    folder is for, named in the message."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        wanted = target if target is not None else path
        where = f" (for {wanted})" if wanted != existing else ""
        raise UsageError(f"{flag}: {existing} is a file, not a folder{where}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".actrain-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = target if target is not None else path
        raise UsageError(
            f"{flag}: cannot write {what}: no file can be made in {existing}"
            f" ({exc.strerror or exc})"
        ) from None
    return path


def writable_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file that can be written: not a folder, writable where it exists, in a
    folder :func:`writable_dir` accepts."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag}: cannot write {path} (permission denied)")
    writable_dir(path.parent, flag, target=path)
    return path


def live_progress(wanted: bool, stream: IO[str] | None = None) -> bool:
    """Whether to draw a live progress bar on ``stream`` (default: stderr): asked for, and the
    stream a terminal. A bar redrawn with carriage returns turned a log file or a pipe into
    one line of thousands of updates; the per-epoch and summary lines are written either way.
    ``ACTRAIN_PROGRESS=1`` draws bars anywhere (a notebook), ``0`` nowhere."""
    if not wanted:
        return False
    forced = os.environ.get("ACTRAIN_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
