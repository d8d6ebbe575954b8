"""WideResNet (Zagoruyko & Komodakis 2016), the standard robust-CIFAR backbone (WRN-28-10, WRN-34-10
in TRADES / Madry-style benchmarks).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from actrain.fused import bn_act, conv_bn_act, input_twin, shortcut_input

from .base import ImageClassifier, check_positive_int
from .registry import register_model

__all__ = ["WideBlock", "WideResNet"]


class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, plus shortcut.

    When the shape changes, the 1x1 projection is applied to the pre-activated input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut: nn.Module = (
            nn.Identity()
            if self.equal_in_out
            else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        # as in PreActBlock: both uses of x (or of act) hand their gradients to the kernel
        same = self.equal_in_out
        act = bn_act(self.bn1, x, fork=not same, twin_input=same)
        shortcut = input_twin(act, x) if same else self.shortcut(shortcut_input(act))
        out = self.conv2(self.dropout(conv_bn_act(self.conv1, self.bn2, act)))
        return out + shortcut


class WideResNet(ImageClassifier):
    """WRN-depth-k: 3 groups of (depth-4)/6 blocks with 16k, 32k, 64k channels."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("widen_factor", widen_factor)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 10, 16, 22, 28, 34, 40), "
                f"got {depth!r}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = channels[0]
        for planes, stride in zip(channels[1:], (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init (fan_out) for convs, unit BN, zero linear bias: the reference WRN recipe."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = bn_act(self.bn, out)
        return torch.flatten(self.pool(out), 1)


@register_model("wideresnet")
def wideresnet(
    num_classes: int = 10,
    in_channels: int = 3,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Generic WRN; depth and widen_factor are free."""
    return WideResNet(num_classes, in_channels, depth, widen_factor, dropout)


@register_model("wrn-28-10")
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (~36.5M parameters); depth/width fixed by the name."""
    return WideResNet(num_classes, in_channels, depth=28, widen_factor=10, dropout=dropout)


@register_model("wrn-34-10")
def wrn_34_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-34-10 (~46.2M parameters), the TRADES CIFAR-10 backbone; depth/width fixed by name."""
    return WideResNet(num_classes, in_channels, depth=34, widen_factor=10, dropout=dropout)
