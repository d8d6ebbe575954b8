"""CIFAR-style ResNet-18 variants (3x3 stride-1 stem, no max-pool) used by TRADES, ACT and
robust_overfitting; ``width`` scales all channels so small CPU-sized versions share the code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from actrain.fused import bn_act, conv_bn_act, input_twin, shortcut_input

from .base import ImageClassifier, check_positive_int
from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "PreActBlock", "PreActResNet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class _ConvBN(nn.Sequential):
    """conv then batch norm, the norm through the fused kernels where they apply (issue 7);
    a Sequential, so that its state-dict keys and the attack passes' BN folding stay as they
    were."""

    def forward(self, x: Tensor) -> Tensor:
        return bn_act(self[1], self[0](x), relu=False)


def _projection(in_planes: int, out_planes: int, stride: int, *, bn: bool) -> nn.Module:
    """1x1 shortcut when shape changes; identity otherwise (standard option B)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    conv = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
    return _ConvBN(conv, nn.BatchNorm2d(out_planes)) if bn else conv


class BasicBlock(nn.Module):
    """Post-activation residual block (conv-BN-ReLU-conv-BN, add, ReLU)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride, bn=True)

    def forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x)
        return conv_bn_act(self.conv2, self.bn2, out, self.shortcut(shortcut_input(x)), fork=True)


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016, identity mappings): BN-ReLU-conv twice, then add.

    The projection shortcut, when present, sees the pre-activated input like the residual branch.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = _projection(in_planes, planes, stride, bn=False)

    def forward(self, x: Tensor) -> Tensor:
        # x feeds bn1 and an identity shortcut, or bn1's output feeds conv1 and the projection:
        # either way the fused kernels take both gradients (actrain.fused, twin_input / fork)
        identity = isinstance(self.shortcut, nn.Identity)
        out = bn_act(self.bn1, x, fork=not identity, twin_input=identity)
        shortcut = input_twin(out, x) if identity else self.shortcut(shortcut_input(out))
        out = self.conv2(conv_bn_act(self.conv1, self.bn2, out))
        return out + shortcut


def _make_stages(
    block: type[nn.Module], width: int, blocks_per_stage: tuple[int, ...]
) -> tuple[nn.Sequential, int]:
    """Stages with channels w, 2w, 4w, 8w; the first is stride 1, the rest downsample by 2."""
    stages = []
    in_planes = width
    for i, n_blocks in enumerate(blocks_per_stage):
        planes = width * 2**i
        strides = [1 if i == 0 else 2] + [1] * (n_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(in_planes, planes, stride))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), in_planes


class CifarResNet(ImageClassifier):
    """ResNet with a 3x3 stride-1 stem and no max-pool, suited to 32x32 inputs (any size >= 8)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.layers, self.num_features = _make_stages(BasicBlock, width, blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x, fork=True)
        out = self.layers(out)
        return torch.flatten(self.pool(out), 1)


class PreActResNet(ImageClassifier):
    """Pre-activation ResNet; a final BN-ReLU precedes pooling since blocks end un-normalised."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        self.conv1 = _conv3x3(in_channels, width)
        self.layers, self.num_features = _make_stages(PreActBlock, width, blocks_per_stage)
        self.bn = nn.BatchNorm2d(self.num_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = bn_act(self.bn, out)
        return torch.flatten(self.pool(out), 1)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-18 (TRADES/ACT); ``width=16`` is the quarter-width CPU-sized variant."""
    return CifarResNet(num_classes, in_channels, width=width)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet-18 as used in robust-overfitting experiments."""
    return PreActResNet(num_classes, in_channels, width=width)
