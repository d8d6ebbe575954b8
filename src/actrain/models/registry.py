"""Name -> builder registry, so configs and checkpoints can refer to architectures by string.

Kept in its own module (rather than ``models/__init__.py``) so the architecture files can import
``register_model`` without a circular import.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from actrain.errors import UserError

__all__ = ["UnknownModelError", "create_model", "list_models", "register_model"]

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

# Builders are called as ``builder(num_classes=..., in_channels=..., **kwargs)``.
_REGISTRY: dict[str, Builder] = {}


class UnknownModelError(UserError):
    """Unregistered architecture name; the message suggests the closest valid one for typos."""


def register_model(name: str) -> Callable[[B], B]:
    """Decorator adding a builder to the registry under ``name``; duplicates are refused."""

    def decorator(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted registry names, for CLI ``choices`` and error messages."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> UnknownModelError:
    choices = list_models()
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownModelError(f"unknown architecture {name!r}{hint} (choices: {', '.join(choices)})")


def create_model(
    name: str | None = None,
    *,
    arch: str | None = None,
    num_classes: int = 10,
    in_channels: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture; attach ``spec`` so ``create_model(**m.spec)`` rebuilds it.

    ``arch`` is an alias of ``name`` so that a stored spec dict can be splatted back in directly.
    """
    if name is not None and arch is not None and name != arch:
        raise ValueError(f"conflicting architecture names: name={name!r}, arch={arch!r}")
    name = name if name is not None else arch
    if name is None:
        raise TypeError("create_model() needs an architecture name (positional or arch=...)")
    if name not in _REGISTRY:
        raise _unknown(name)

    spec: dict[str, Any] = {
        "arch": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        **kwargs,
    }
    try:
        json.dumps(spec)
    except TypeError as err:
        # The spec is written into checkpoints as JSON; fail now rather than at save time.
        raise TypeError(f"model kwargs must be JSON-serialisable: {err}") from err

    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_any:
        options = [p for p in params if p not in ("num_classes", "in_channels")]
        raise TypeError(
            f"create_model({name!r}): unknown option{'s' * (len(unknown) > 1)}"
            f" {', '.join(unknown)}; {name} takes {', '.join(options) or 'no options'}"
        )
    model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.spec = spec
    return model
