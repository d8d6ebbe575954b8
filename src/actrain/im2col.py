"""3x3 convolutions as one bf16 matmul on CPUs, for the shapes where oneDNN is slow (issue 7).

On this project's AMX CPU oneDNN runs ResNet-18's last stage at full width (512 channels at
4x4) at a quarter of its speed elsewhere: its backward takes 90 ms where the same FLOPs at
128 channels and 16x16 take 16 ms. Written as im2col + matmul its backward takes 24.5 ms
(`python benchmarks/micro.py conv`; 28 ms while the input gradient of a stride-1 conv was
nine matmul outputs scattered back, now it is the conv of the output gradient with the
flipped weights). :class:`Im2colConv2d` takes that path for the shapes
where it measured faster (:func:`im2col_pays`) under bf16 autocast on a CPU (the Trainer
switches it on where the CPU has AMX, the only kind measured); everywhere else
(GPUs, fp32, other shapes) it is a plain ``nn.Conv2d``.

Where only oneDNN's weight gradient is slow, the conv keeps oneDNN's forward and input
gradient and takes the weight gradient alone (:func:`weight_grad_by_matmul`): for 3x3 convs
with multiples of 16 channels from the AMX kernel of ``fused_bn.c``
(:func:`actrain.fused.amx_weight_grad`; oneDNN's bf16 weight gradients run at a third to a
half of its forward rate here), elsewhere as one matmul over the patches (small outputs: 3x
at 128 channels 4x4 without AMX; 1x1 projections). Patches go to a reused per-thread buffer:
a fresh one of megabytes per call costs its page faults.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor, nn

from actrain.fused import amx_weight_grad, amx_weight_grad_fits


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 3x3 kernel, padding 1


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reused buffer of this thread for patches that are consumed at once: a fresh one of
    megabytes would be page-faulted in on every call (as slow as the gather itself)."""
    numel = math.prod(shape)
    key = (like.dtype, like.device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


_PADDED_SHAPES = 8  # padded buffers kept per thread (ResNet-18 at full width uses 3)


def _padded(x: Tensor) -> Tensor:
    """NCHW ``x`` as NHWC with a zero border of one pixel, in a buffer of this thread kept per
    shape: its border is zeroed once, and each call copies only the interior (``F.pad``
    zero-fills the whole tensor every time, 6.5 ms of a full-width train pass). Valid until
    the next call with the same shape; the patches are gathered from it at once."""
    n, c, h, w = x.shape
    key = (n, h, w, c, x.dtype, x.device)
    buffers = getattr(_SCRATCH, "padded", None)
    if buffers is None:
        buffers = _SCRATCH.padded = {}
    buf = buffers.pop(key, None)  # re-inserted last: the dict keeps the shapes in use order
    if buf is None:
        if len(buffers) >= _PADDED_SHAPES:
            del buffers[next(iter(buffers))]
        buf = x.new_zeros(n, h + 2, w + 2, c)
    buffers[key] = buf
    buf[:, 1:-1, 1:-1, :].copy_(x.permute(0, 2, 3, 1))
    return buf


def _cols(x: Tensor, stride: int = 1, reuse: bool = False) -> Tensor:
    """Rows of 3x3 patches (padding 1) in (i, j, channel) order, from an NCHW tensor: one
    gather through a strided view of the padded NHWC input (half the time of stacking the
    nine shifted slices). ``reuse``: into this thread's scratch buffer (see
    :func:`_scratch`), valid until the next such call."""
    n, c, h, w = x.shape
    xp = _padded(x)
    s_n, s_h, s_w, s_c = xp.stride()
    ho, wo = _out_size(h, stride), _out_size(w, stride)
    shape = (n, ho, wo, 3, 3, c)
    patches = xp.as_strided(shape, (s_n, stride * s_h, stride * s_w, s_h, s_w, s_c))
    out = _scratch(shape, x) if reuse else x.new_empty(shape)  # never a view of the padding
    return out.copy_(patches).view(n * ho * wo, 9 * c)


def _wanted(ctx, i: int) -> bool:
    """Whether this backward must compute input ``i``'s gradient: the input requires one
    (``needs_input_grad``, fixed at forward) and this backward pass will use it. An attack's
    ``autograd.grad`` w.r.t. the image does not use the weights' gradients, which PyTorch's own
    conv backward then skips; a custom function has to ask the engine."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if node is None or will_execute is None:
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:  # a leaf under autograd.grad, which the engine cannot tell: compute
        return True


def _param_grad(ctx, grad: Tensor) -> Tensor:
    """``grad`` in the weight parameter's dtype and layout, in one copy (none where it has
    them), so that autograd's accumulation takes it as is. The functions take the fp32
    parameter and cast it themselves: a bf16 cast outside would round the weight gradient to
    bf16 and add a cast back and a layout copy, three passes over it (at full width 12 copies
    of a 256-channel weight per train pass, 10 ms)."""
    dtype, stride = ctx.weight_meta
    if grad.dtype == dtype and grad.stride() == stride:
        return grad
    return torch.empty_strided(grad.shape, stride, dtype=dtype).copy_(grad)


def _flipped_rows(weight: Tensor) -> Tensor:
    """The weights flipped and transposed, as rows ((i, j, o), c) = weight[o, c, 2 - i, 2 - j]:
    each row is one of the (o, kh, kw) rows of channels_last weights, so one row gather (0.60
    ms for 512 channels) instead of flip + reshape, two strided copies (1.14 ms)."""
    o, c = weight.shape[:2]
    rows = weight.permute(0, 2, 3, 1).reshape(o * 9, c)  # a view of channels_last weights
    taps = torch.arange(8, -1, -1, device=weight.device).view(9, 1)  # tap (i, j) reads 8 - t
    return rows.index_select(0, (torch.arange(o, device=weight.device) * 9 + taps).reshape(-1))


class _Im2colConv(torch.autograd.Function):
    """3x3 convolution, padding 1, stride 1 or 2, in ``x``'s dtype; patches are recomputed in
    backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
        n, _, h, w = x.shape
        o = weight.shape[0]
        ctx.weight_meta = weight.dtype, weight.stride()
        weight = weight.to(x.dtype)
        wm = weight.permute(0, 2, 3, 1).reshape(o, -1)
        ho, wo = _out_size(h, stride), _out_size(w, stride)
        # the matmul writes into a channels_last tensor of its own, not a view: the next layer
        # may modify it in place (torchvision's Bottleneck: ReLU(inplace=True))
        y = torch.empty(
            (n, o, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )
        out = y.permute(0, 2, 3, 1).view(-1, o)
        torch.mm(_cols(x, stride, reuse=True), wm.t(), out=out)
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.stride = stride
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        s = ctx.stride
        n, c, h, w = x.shape
        ho, wo = _out_size(h, s), _out_size(w, s)
        o = weight.shape[0]
        g = grad_out.permute(0, 2, 3, 1).reshape(-1, o)
        grad_x = grad_w = grad_b = None
        if _wanted(ctx, 0) and s == 1:
            # the input gradient of a stride-1 conv is the conv of the output gradient with the
            # weights flipped and transposed: patches + one matmul, like the forward (half the
            # time of scattering nine shifted matmul outputs back, 512 channels at 4x4)
            gx = _cols(grad_out, 1, reuse=True) @ _flipped_rows(weight)
            grad_x = gx.view(n, h, w, c).permute(0, 3, 1, 2)  # a channels_last NCHW view
        elif _wanted(ctx, 0):
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
        if _wanted(ctx, 1):
            gw = g.t().contiguous() @ _cols(x, s, reuse=True)
            grad_w = _param_grad(ctx, gw.view(o, 3, 3, c).permute(0, 3, 1, 2))
        if ctx.has_bias and _wanted(ctx, 2):
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


class _MatmulWeightGradConv(torch.autograd.Function):
    """oneDNN's convolution and (3x3) input gradient, with the weight gradient from the AMX
    kernels of ``fused_bn.c`` (3x3, padding 1, where they fit) or as one bf16 matmul over the
    patches (3x3) or the strided input (1x1, no padding); ``own_weight_grad`` False leaves the
    weight gradient to oneDNN. A 1x1 strided conv's input gradient is one matmul
    (:func:`strided_pointwise_input_grad`)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: int,
        own_weight_grad: bool = True,
    ) -> Tensor:
        ctx.weight_meta = weight.dtype, weight.stride()
        weight = weight.to(x.dtype)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias, ctx.own_weight_grad = stride, bias is not None, own_weight_grad
        pad = weight.shape[-1] // 2
        return torch.ops.aten.convolution(
            x, weight, bias, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1
        )

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        s, (o, c, k, _) = ctx.stride, weight.shape
        g = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if _wanted(ctx, 0) and k == 1:
            grad_x = strided_pointwise_input_grad(g, weight, x.shape, s)
        elif _wanted(ctx, 0):
            grad_x = torch.ops.aten.convolution_backward(
                g, x, weight, None, [s] * 2, [k // 2] * 2, [1, 1], False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        gm = g.permute(0, 2, 3, 1).reshape(-1, o)  # rows (n, i, j), a view of channels_last g
        if _wanted(ctx, 1):
            own = ctx.own_weight_grad  # else only the input gradient is this class's
            if own and k == 3 and amx_weight_grad_pays(c, o, s):
                if amx_weight_grad_fits(x, g, weight, s):
                    grad_w = amx_weight_grad(x, g, s)  # None where the kernel could not run
            if grad_w is None and own and (k == 1 or _matmul_pays(c, g.shape[2], g.shape[3])):
                cols = (
                    _cols(x, s, reuse=True)
                    if k == 3
                    else x[:, :, ::s, ::s].permute(0, 2, 3, 1).reshape(-1, c)
                )
                gw = torch.mm(cols.t(), gm)  # (k * k * c, o)
                grad_w = gw.t().view(o, k, k, c).permute(0, 3, 1, 2)
            elif grad_w is None:  # oneDNN's, as a plain conv would
                grad_w = torch.ops.aten.convolution_backward(
                    g, x, weight, None, [s, s], [k // 2] * 2, [1, 1], False, [0, 0], 1,
                    [False, True, False],
                )[1]  # fmt: skip
            grad_w = _param_grad(ctx, grad_w)  # the AMX kernels': fp32, not rounded to bf16
        if ctx.has_bias and _wanted(ctx, 2):
            grad_b = gm.sum(0)
        return grad_x, grad_w, grad_b, None, None


def strided_pointwise_input_grad(
    grad_out: Tensor, weight: Tensor, input_shape: torch.Size, stride: int
) -> Tensor:
    """The input gradient of a 1x1 conv with stride s (a ResNet's projection shortcut): one
    matmul of the output gradient with the weight, written to every s-th position of a zero
    tensor (channels_last). The same values as oneDNN's, which takes 1.6-4x as long in bf16
    (width 16: 0.95 -> 0.59, 0.48 -> 0.25, 0.28 -> 0.12 ms; full width 7.07 -> 1.65, 1.62 ->
    0.95, 1.89 -> 0.68 ms; one thread, batch 128)."""
    n, c, h, w = input_shape
    o = weight.shape[0]
    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, o)  # a view of channels_last grad_out
    sub = torch.mm(rows, weight.reshape(o, c))
    grad_x = grad_out.new_zeros(n, h, w, c)
    grad_x[:, ::stride, ::stride, :] = sub.view(n, grad_out.shape[2], grad_out.shape[3], c)
    return grad_x.permute(0, 3, 1, 2)


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


def weight_grad_by_matmul(
    kernel: int,
    in_channels: int,
    height: int,
    width: int,
    stride: int = 1,
    out_channels: int | None = None,
) -> bool:
    """Where the conv takes its weight gradient apart from oneDNN's backward (by output
    positions): 3x3 convs with multiples of 16 channels in and out, where the CPU has AMX, go
    to the AMX kernel of ``fused_bn.c`` (:func:`amx_weight_grad_pays`); other 3x3 convs with
    at most 4x4 outputs and at least 64 input channels to one matmul over the patches (128
    channels 4x4: 3.41 -> 1.72 ms; 64 -> 128 into 4x4: 2.13 -> 1.19 ms; 64 channels at 8x8
    would take 1.7x longer); 1x1 stride-2 projections from at least 32 channels to one matmul
    (64 -> 128: 0.50 -> 0.23 ms; 0.8x at 32 channels, 1.5x at 16). Where
    :func:`im2col_pays`, im2col takes the whole convolution instead."""
    if kernel == 1:
        return stride == 2 and in_channels >= 32
    if amx_weight_grad_pays(in_channels, out_channels or in_channels, stride):
        return True
    return _matmul_pays(in_channels, height, width)


def _matmul_pays(in_channels: int, height: int, width: int) -> bool:
    return height * width <= 16 and in_channels >= 64


def amx_weight_grad_pays(in_channels: int, out_channels: int, stride: int = 1) -> bool:
    """3x3 convs whose weight gradient goes to the AMX kernels of ``fused_bn.c``: every shape
    of ResNet-18 at width 16 and 64 that they take, on a CPU with AMX. Measured against
    oneDNN's bf16 weight gradient (`python benchmarks/micro.py wgrad 16`, `... wgrad 64`; one
    thread, batch 128): 0.5-0.8 ms where oneDNN takes 0.9-3.1 ms at width 16, and 7-15 ms
    where it takes 9-70 ms at full width."""
    if in_channels % 16 or out_channels % 16 or stride not in (1, 2):
        return False
    from actrain.fused import available
    from actrain.runtime import cpu_has_amx

    return cpu_has_amx() and available()


class Im2colConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs as im2col + matmul where that was measured faster, or
    takes only its weight gradient as a matmul (:func:`weight_grad_by_matmul`), or (1x1
    strided, in train and attack passes) its input gradient as one."""

    def forward(self, x: Tensor) -> Tensor:
        if not (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling()  # torch.compile: its own conv kernels
        ):
            return super().forward(x)
        stride, k = self.stride[0], self.kernel_size[0]
        out_h, out_w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        if k == 3 and im2col_pays(x.shape[1], out_h, out_w, stride):
            self.im2col_used = True  # reported by `actrain bench`
            with torch.autocast("cpu", enabled=False):  # the weight is cast inside
                return im2col_conv3x3(x.to(torch.bfloat16), self.weight, bias, stride)
        weight_grad = (
            self.weight.requires_grad
            and getattr(self, "matmul_weight_grads", True)
            and weight_grad_by_matmul(k, x.shape[1], out_h, out_w, stride, self.out_channels)
        )
        # a projection shortcut's input gradient, in train and attack passes alike
        input_grad = k == 1 and stride > 1 and x.requires_grad
        if torch.is_grad_enabled() and (weight_grad or input_grad):
            if weight_grad:
                self.matmul_weight_grad_used = True  # reported by `actrain bench`
            with torch.autocast("cpu", enabled=False):  # the weight is cast inside
                xb = x.to(torch.bfloat16)
                return _MatmulWeightGradConv.apply(xb, self.weight, bias, stride, weight_grad)
        return super().forward(x)


def use_im2col_convs(model: nn.Module, weight_grads: bool = True) -> int:
    """Let every eligible conv of ``model`` (3x3 with stride 1 or 2 and padding 1, or 1x1
    with stride 2 and no padding; no groups or dilation) pick im2col + matmul per shape, and
    (``weight_grads``) the weight-gradient matmul; returns how many convs are eligible.
    Weights, state dict and results are unchanged (within bf16 rounding of the summation
    order)."""
    count = 0
    for m in model.modules():
        if (
            type(m) is nn.Conv2d
            and (
                (m.kernel_size == (3, 3) and m.stride in ((1, 1), (2, 2)) and m.padding == (1, 1))
                or (m.kernel_size == (1, 1) and m.stride == (2, 2) and m.padding == (0, 0))
            )
            and m.dilation == (1, 1)
            and m.groups == 1
            and m.padding_mode == "zeros"
        ):
            m.__class__ = Im2colConv2d
            m.matmul_weight_grads = weight_grads
            count += 1
    return count
