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


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 3x3 kernel, padding 1


def _cols(x: Tensor, stride: int = 1) -> Tensor:
    """Rows of 3x3 patches (padding 1) in (i, j, channel) order, from an NCHW tensor: one
    gather through a strided view of the padded NHWC input (half the time of stacking the
    nine shifted slices)."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    s_n, s_h, s_w, s_c = xp.stride()
    ho, wo = _out_size(h, stride), _out_size(w, stride)
    shape = (n, ho, wo, 3, 3, c)
    patches = xp.as_strided(shape, (s_n, stride * s_h, stride * s_w, s_h, s_w, s_c))
    return patches.reshape(n * ho * wo, 9 * c)


class _Im2colConv(torch.autograd.Function):
    """3x3 convolution, padding 1, stride 1 or 2; patches are recomputed in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
        n, _, h, w = x.shape
        o = weight.shape[0]
        wm = weight.permute(0, 2, 3, 1).reshape(o, -1)
        out = _cols(x, stride) @ wm.t()
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.stride = stride
        ho, wo = _out_size(h, stride), _out_size(w, stride)
        return out.view(n, ho, wo, o).permute(0, 3, 1, 2)  # a channels_last NCHW view

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        s = ctx.stride
        n, c, h, w = x.shape
        ho, wo = _out_size(h, s), _out_size(w, s)
        o = weight.shape[0]
        g = grad_out.permute(0, 2, 3, 1).reshape(-1, o)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gc = (g @ weight.permute(0, 2, 3, 1).reshape(o, -1)).view(n, ho, wo, 3, 3, c)
            gxp = x.new_zeros(n, h + 2, w + 2, c)
            for i in range(3):
                for j in range(3):
                    rows, cols = (
                        slice(i, i + s * (ho - 1) + 1, s),
                        slice(j, j + s * (wo - 1) + 1, s),
                    )
                    gxp[:, rows, cols, :] += gc[:, :, :, i, j, :]
            grad_x = gxp[:, 1:-1, 1:-1, :].permute(0, 3, 1, 2)
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            gw = g.t().contiguous() @ _cols(x, s)
            grad_w = gw.view(o, 3, 3, c).permute(0, 3, 1, 2)  # (o, c, 3, 3), channels_last
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


def im2col_conv3x3(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding=1)`` for a 3x3 kernel, as one matmul."""
    return _Im2colConv.apply(x, weight, bias, stride)


def im2col_pays(in_channels: int, height: int, width: int, stride: int = 1) -> bool:
    """Where im2col + matmul beat oneDNN's bf16 conv (forward + backward) on this project's
    AMX CPU (`python benchmarks/micro.py shapes`), by output positions: stride 1 at most 4x4
    and at least 384 input channels (0.45x of oneDNN's time at 512 channels, 0.52x at 384,
    0.93x at 256, 1.6x at 128; 1.6x and more at 8x8 and larger); stride 2 at most 4x4 out and
    at least 128 input channels (0.41x at 256 -> 512, 0.53x at 192, 0.77x at 128, 1.4x at
    64; 1.5x at 8x8 out). A fixed rule, not a timing at run time, so that a run computes the
    same way every time."""
    if height * width > 16:
        return False
    return in_channels >= (384 if stride == 1 else 128)


class Im2colConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs as im2col + matmul where that was measured faster."""

    def forward(self, x: Tensor) -> Tensor:
        if not (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        ):
            return super().forward(x)
        stride = self.stride[0]
        out_h, out_w = _out_size(x.shape[2], stride), _out_size(x.shape[3], stride)
        if not im2col_pays(x.shape[1], out_h, out_w, stride):
            return super().forward(x)
        self.im2col_used = True  # reported by `actrain bench`
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            w = self.weight.to(torch.bfloat16)
            return im2col_conv3x3(x.to(torch.bfloat16), w, bias, stride)


def use_im2col_convs(model: nn.Module) -> int:
    """Let every eligible conv of ``model`` (3x3, stride 1 or 2, padding 1, no groups or
    dilation) pick im2col + matmul per shape; returns how many convs are eligible. Weights,
    state dict and results are unchanged (within bf16 rounding of the summation order)."""
    count = 0
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and m.kernel_size == (3, 3)
            and m.stride in ((1, 1), (2, 2))
            and m.padding == (1, 1)
            and m.dilation == (1, 1)
            and m.groups == 1
            and m.padding_mode == "zeros"
        ):
            m.__class__ = Im2colConv2d
            count += 1
    return count
