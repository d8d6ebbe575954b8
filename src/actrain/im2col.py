"""3x3 convolutions as one bf16 matmul on CPUs, for the shapes where oneDNN is slow (issue 7).

On this project's AMX CPU oneDNN runs ResNet-18's last stage at full width (512 channels at
4x4) at a quarter of its speed elsewhere: its backward takes 90 ms where the same FLOPs at
128 channels and 16x16 take 16 ms. Written as im2col + matmul its backward takes 35 ms
(`python benchmarks/micro.py conv`). :class:`Im2colConv2d` takes that path for the shapes
where it measured faster (:func:`im2col_pays`) under bf16 autocast on a CPU (the Trainer
switches it on where the CPU has AMX, the only kind measured); everywhere else
(GPUs, fp32, other shapes) it is a plain ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cols(x: Tensor) -> Tensor:
    """Rows of 3x3 patches (padding 1) in (i, j, channel) order, from an NCHW tensor."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    patches = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    return torch.stack(patches, dim=3).reshape(n * h * w, 9 * c)


class _Im2colConv(torch.autograd.Function):
    """Stride 1, padding 1, 3x3 convolution; patches are recomputed in backward, not stored."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        n, _, h, w = x.shape
        o = weight.shape[0]
        wm = weight.permute(0, 2, 3, 1).reshape(o, -1)
        out = _cols(x) @ wm.t()
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out.view(n, h, w, o).permute(0, 3, 1, 2)  # a channels_last NCHW view

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        o = weight.shape[0]
        g = grad_out.permute(0, 2, 3, 1).reshape(-1, o)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gc = (g @ weight.permute(0, 2, 3, 1).reshape(o, -1)).view(n, h, w, 3, 3, c)
            gxp = x.new_zeros(n, h + 2, w + 2, c)
            for i in range(3):
                for j in range(3):
                    gxp[:, i : i + h, j : j + w, :] += gc[:, :, :, i, j, :]
            grad_x = gxp[:, 1:-1, 1:-1, :].permute(0, 3, 1, 2)
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            gw = g.t().contiguous() @ _cols(x)
            grad_w = gw.view(o, 3, 3, c).permute(0, 3, 1, 2)  # (o, c, 3, 3), channels_last
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def im2col_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel, as one matmul."""
    return _Im2colConv.apply(x, weight, bias)


def im2col_pays(in_channels: int, height: int, width: int) -> bool:
    """Where im2col + matmul beat oneDNN's bf16 conv (forward + backward) on this project's
    AMX CPU (`python benchmarks/micro.py shapes`): at most 4x4 positions and at least 384
    input channels (0.45x of oneDNN's time at 512 channels, 0.52x at 384, 0.93x at 256,
    1.6x at 128; 1.6x and more at 8x8 and larger). A fixed rule, not a timing at run time,
    so that a run computes the same way every time."""
    return height * width <= 16 and in_channels >= 384


class Im2colConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs as im2col + matmul where that was measured faster."""

    def forward(self, x: Tensor) -> Tensor:
        if not (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        ):
            return super().forward(x)
        if not im2col_pays(x.shape[1], x.shape[2], x.shape[3]):
            return super().forward(x)
        self.im2col_used = True  # reported by `actrain bench`
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            return im2col_conv3x3(x.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias)


def use_im2col_convs(model: nn.Module) -> int:
    """Let every eligible conv of ``model`` (3x3, stride 1, padding 1, no groups or dilation)
    pick im2col + matmul per shape; returns how many convs are eligible. Weights, state dict
    and results are unchanged (within bf16 rounding of the summation order)."""
    count = 0
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and m.kernel_size == (3, 3)
            and m.stride == (1, 1)
            and m.padding == (1, 1)
            and m.dilation == (1, 1)
            and m.groups == 1
            and m.padding_mode == "zeros"
        ):
            m.__class__ = Im2colConv2d
            count += 1
    return count
