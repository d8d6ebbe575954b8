"""ImageNet ResNet-50 with normalisation inside the model.

Attacks define epsilon-balls in [0, 1] pixel space, so the model (not the data pipeline) must
apply the mean/std normalisation; otherwise the perturbation budget would be silently rescaled.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ImageClassifier, check_positive_int
from .registry import register_model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NormalizedResNet50"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalizedResNet50(ImageClassifier):
    """torchvision ResNet-50 (random init) taking [0, 1] inputs; its ``fc`` is ``classifier``.

    ``net.fc`` is replaced by an identity so ``net`` yields the pooled 2048-d features and the
    linear head lives only under ``classifier`` (no duplicated state_dict entries).
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        if in_channels != 3:
            raise ValueError(f"resnet50 expects RGB input (in_channels=3), got {in_channels!r}")
        # Imported lazily: torchvision is slow to import and only this model needs it.
        from torchvision.models import resnet50 as tv_resnet50

        net = tv_resnet50(weights=None, num_classes=num_classes)
        self.classifier = net.fc
        net.fc = nn.Identity()
        self.net = net
        self.num_features = self.classifier.in_features
        # Non-persistent would break loading into a differently-normalised model unnoticed;
        # keep them in the state_dict so checkpoints record the normalisation they used.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        """Map [0, 1] pixels to the ImageNet-standardised scale torchvision weights expect."""
        return (x - self.mean) / self.std

    def features(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


@register_model("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3) -> NormalizedResNet50:
    """ImageNet ResNet-50; pass ``num_classes=1000`` for the full ImageNet head."""
    return NormalizedResNet50(num_classes, in_channels)
