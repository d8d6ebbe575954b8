"""Sub-commands of the ``actrain`` CLI, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
``run(namespace) -> int``. Add a new command by adding its module name to ``COMMANDS``.
"""

from __future__ import annotations

from actrain.errors import UsageError

__all__ = ["COMMANDS", "UsageError"]


COMMANDS = ("train", "eval", "bench", "analyze", "sweep", "report")
