"""Model zoo for adversarial training: build architectures by name via ``create_model``.

Every model takes [0, 1] inputs [N, C, H, W], returns logits [N, num_classes], exposes
``features(x) -> [N, D]`` and ``classifier`` (the final ``nn.Linear``), and carries a JSON-able
``spec`` such that ``create_model(**model.spec)`` rebuilds the same architecture.
"""

from __future__ import annotations

# Importing the architecture modules fills the registry via ``@register_model``.
from . import imagenet, resnet, small_cnn, wideresnet  # noqa: F401
from .base import ImageClassifier
from .registry import UnknownModelError, create_model, list_models, register_model

__all__ = [
    "ImageClassifier",
    "UnknownModelError",
    "create_model",
    "list_models",
    "register_model",
]
