"""Model zoo for adversarial training: build architectures by name via ``create_model``.

Every model takes [0, 1] inputs [N, C, H, W], returns logits [N, num_classes], exposes
``features(x) -> [N, D]`` and ``classifier`` (the final ``nn.Linear``), and carries a JSON-able
``spec`` such that ``create_model(**model.spec)`` rebuilds the same architecture.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The registered names, known without importing torch so the CLI can check --arch instantly.
# tests/test_models.py checks that this equals list_models().
ARCHITECTURES = (
    "preact_resnet18",
    "resnet18",
    "resnet50",
    "small_cnn",
    "wideresnet",
    "wrn-28-10",
    "wrn-34-10",
)

if TYPE_CHECKING:  # pragma: no cover
    from .base import ImageClassifier
    from .registry import UnknownModelError, create_model, list_models, register_model


def _load() -> Any:
    # Importing the architecture modules fills the registry via ``@register_model``.
    for name in ("imagenet", "resnet", "small_cnn", "wideresnet"):
        importlib.import_module(f"actrain.models.{name}")
    return importlib.import_module("actrain.models.registry")


def __getattr__(name: str) -> Any:
    if name in ("UnknownModelError", "create_model", "list_models", "register_model"):
        value = getattr(_load(), name)
    elif name == "ImageClassifier":
        value = importlib.import_module("actrain.models.base").ImageClassifier
    else:
        raise AttributeError(f"module 'actrain.models' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "ARCHITECTURES",
    "ImageClassifier",
    "UnknownModelError",
    "create_model",
    "list_models",
    "register_model",
]
