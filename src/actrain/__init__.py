"""actrain: Adversarial Concurrent Training (ACT) and its baselines in PyTorch.

The top-level names are imported lazily so that the command line can reject a mistyped flag
before paying for ``import torch``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "load_model"]

_LAZY = {
    "load_model": "actrain.checkpoint",
    "create_model": "actrain.models",
    "list_models": "actrain.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actrain' has no attribute {name!r}")
