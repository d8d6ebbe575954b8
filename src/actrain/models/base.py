"""Common interface of every registry model: ``forward = classifier(features(x))``.

Splitting the penultimate representation from the final linear layer lets analyses (e.g. fitting
an MLP probe on frozen features) reuse any architecture without knowing its internals.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["ImageClassifier", "check_positive_int"]


def check_positive_int(name: str, value: Any) -> int:
    """Reject bools, floats and non-positive values early, with the offending argument named."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ImageClassifier(nn.Module):
    """Base class: inputs in [0, 1] of shape [N, C, H, W], logits [N, num_classes]."""

    classifier: nn.Linear
    #: Width D of ``features(x)`` ([N, D]); the ``in_features`` of ``classifier``.
    num_features: int
    #: Filled in by ``create_model``; ``create_model(**spec)`` rebuilds the architecture.
    spec: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.spec = {}

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation [N, D]: after global pooling, before ``classifier``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
