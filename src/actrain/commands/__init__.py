"""Sub-commands of the ``actrain`` CLI, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
``run(namespace) -> int``. Add a new command by adding its module name to ``COMMANDS``.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line mistake; printed as one line with exit code 2."""


COMMANDS = ("train", "eval", "bench", "analyze", "sweep", "report")
