"""Error type for data problems the user can fix (paths, layouts, names, unreadable files)."""

from __future__ import annotations

import re

from actrain.errors import UserError

# torch.utils.data re-raises a worker's exception as `type(exc)(message)`, where message is
# "Caught <Name> in DataLoader worker process <n>.\nOriginal Traceback ...<whole traceback>".
_WORKER_HEADER = re.compile(r"\ACaught \w+ in [^\n]*\.\nOriginal Traceback \(most recent call")


def _qualified_name(cls: type) -> str:
    """The class name as `traceback` prints it on the exception's last line."""
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def original_message(message: str, cls: type) -> str:
    """The message a worker raised, recovered from DataLoader's re-raise text.

    Any other message is returned unchanged, so this is safe to apply to every message.
    """
    if not _WORKER_HEADER.match(message):
        return message
    marker = f"\n{_qualified_name(cls)}: "
    at = message.rfind(marker)  # the last one: chained causes are printed before it
    if at < 0:
        return message
    return message[at + len(marker) :].strip()


class DataError(UserError):
    """A one-line, user-facing data problem.

    Raised instead of torchvision's generic RuntimeError so that the CLI can print the message
    without a traceback: it always says what was expected and how to fix it. When a DataLoader
    worker raises it, DataLoader re-creates it in the main process from a message holding the
    worker's whole traceback; the constructor keeps only the original one-line message.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (original_message(args[0], type(self)),)
        super().__init__(*args)
