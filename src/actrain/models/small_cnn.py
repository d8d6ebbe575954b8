"""A small fast CNN for tiny inputs (8x8 sklearn digits, 28x28 MNIST) and CPU demos/tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ImageClassifier, check_positive_int
from .registry import register_model

__all__ = ["SmallCNN"]


def _conv_bn_relu(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_planes),
        nn.ReLU(inplace=True),
    )


class SmallCNN(ImageClassifier):
    """Three conv-BN-ReLU layers (w, 2w, 4w channels; strides 1, 2, 2), global average pool.

    Adaptive pooling makes it size-agnostic, so 8x8 digits (-> 2x2 maps) work as well as MNIST.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 4 * width
        self.classifier = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> SmallCNN:
    """Small CNN; pass ``in_channels=1`` for grey inputs such as digits or MNIST."""
    return SmallCNN(num_classes, in_channels, width=width)
