"""Batch norm + residual add + ReLU as fused CPU kernels for bf16 training steps (issue 7).

Eager PyTorch runs a ResNet block's ``relu(bn(conv(x)) + shortcut)`` as four passes over the
activation forward and as many backward; on this project's CPU, at ResNet-18 width 16, those
passes cost more than the block's convolutions. :func:`bn_act` does training-mode batch norm,
the optional residual add and ReLU in two passes forward (statistics; normalise + add + ReLU,
which also writes a one-bit ReLU mask) and two backward, and in the attack passes, where batch
norm is folded into the convolutions (:class:`actrain.runtime.AttackView`), add + ReLU in one
(:func:`conv_bn_act`: inside oneDNN's convolution, as post-ops). A batch norm that cannot be
folded (after a pre-activation block's add) is its constant affine map in the attack passes
(:class:`FrozenBatchNorm2d`), one pass with the ReLU. Where a block reads a tensor twice
(first conv and shortcut), the kernel that made it hands out a twin sharing its memory, so
that its backward gets the two gradients apart and sums them in a pass it makes anyway
(``fork`` / ``twin_input``). The kernels are C (``fused_bn.c``), built once per machine with
the system's C compiler and called through ``ctypes``.

They only run where they were written for: layers that :func:`use_fused_bn` switched on, bf16
channels_last CPU tensors with a multiple of 16 channels, eager mode. Anywhere else (GPUs,
fp32, eval-mode BN, no C compiler) :func:`bn_act` is the plain ``F.relu(bn(x) + residual)``.
Results match the plain ops within bf16 rounding (each output is rounded once instead of after
every op); running statistics are updated the same way, and the state dict is untouched.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("fused_bn.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_P, _I, _N, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "bn_forward": (_N, [_P, _P, _I, _I, _P, _P, _P, _P, _D, _D, _P, _P, _P, _P, _N]),
    "bn_backward": (_N, [_P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _N]),
    "relu_forward": (None, [_P, _P, _I, _I, _P, _P, _N]),
    "relu_backward": (None, [_P, _P, _P, _I, _P, _N]),
    "relu_backward_from_output": (None, [_P, _P, _P, _I, _P, _N]),
    "affine_forward": (None, [_P, _I, _I, _P, _P, _P, _P, _N]),
    "affine_backward": (None, [_P, _P, _P, _I, _I, _P, _P, _P, _N]),
    "wgrad3x3_c16": (_N, [_P, _P, _I, _I, _P, _N]),
    "wgrad3x3": (_N, [_P, _P, _I, _I, _I, _I, _I, _N, _P, _N]),
    "transpose_f32": (None, [_P, _P, _I, _I]),
}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "actrain"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on, so a build is never reused on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(compiler: str, flags: tuple[str, ...] = CFLAGS) -> Path:
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join((compiler, *flags, _cpu_signature())).encode()
    ).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "actrain"):
        target = folder / f"fused_bn-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            cmd = [compiler, *flags, str(SOURCE), "-o", tmp]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)  # atomic: concurrent builders each publish a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target
    raise OSError("no writable cache folder")


def load(flags: tuple[str, ...] = CFLAGS) -> ctypes.CDLL | None:
    """Build (once per machine, cached) and load the kernels; None where that fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SOURCE.exists():
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, flags)))
    except (OSError, subprocess.SubprocessError):
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels built for this CPU, or None where they cannot be built (no C compiler or
    OpenMP): :func:`bn_act` then takes the plain ops."""
    return load()


def available() -> bool:
    return library() is not None


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _checked(status: int) -> None:
    if status != 0:
        raise MemoryError("actrain fused batch norm: out of memory")


class _BatchNormAct(torch.autograd.Function):
    """relu?(batch_norm(x) + residual?) in training mode, for bf16 channels_last x."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, bn: nn.BatchNorm2d, relu, fork, twin_input):
        ctx.set_materialize_grads(False)
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        # the ReLU mask, one bit per element, is what the backward reads instead of y
        mask = torch.empty(n * h * w * c // 16, dtype=torch.int16) if relu else None
        mean, invstd = torch.empty(2, c)
        bn.num_batches_tracked.add_(1)  # the buffers change as in nn.BatchNorm2d's forward
        status = library().bn_forward(
            _ptr(x), _ptr(residual), n * h * w, c, _ptr(weight), _ptr(bias),
            _ptr(bn.running_mean), _ptr(bn.running_var), bn.momentum, bn.eps, _ptr(y),
            _ptr(mask), _ptr(mean), _ptr(invstd), torch.get_num_threads(),
        )  # fmt: skip
        _checked(status)
        ctx.save_for_backward(x, mask, weight, mean, invstd)
        ctx.has_residual = residual is not None
        return _forked(y, fork, x if twin_input else None)

    @staticmethod
    def backward(ctx, grad_y, grad_twin=None, grad_x_twin=None):
        x, mask, weight, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        grad_y, grad_twin = _output_grads(grad_y, grad_twin)
        grad_x_twin = _kernel_grad(grad_x_twin)
        if grad_y is None:
            return grad_x_twin, None, None, None, None, None, None, None
        dz = torch.empty_like(x) if ctx.has_residual else None
        grad_x = torch.empty_like(x)
        grad_w, grad_b = torch.empty(2, c)
        status = library().bn_backward(
            _ptr(grad_y), _ptr(grad_twin), _ptr(mask), _ptr(x), n * h * w, c, _ptr(weight),
            _ptr(mean), _ptr(invstd), _ptr(dz), _ptr(grad_x), _ptr(grad_x_twin), _ptr(grad_w),
            _ptr(grad_b), torch.get_num_threads(),
        )  # fmt: skip
        _checked(status)
        return grad_x, grad_w, grad_b, dz, None, None, None, None


class _AddReLU(torch.autograd.Function):
    """relu(x + residual?) for bf16 channels_last x: the attack passes' blocks, where batch
    norm is folded into the convolutions. The backward reads a one-bit mask, not y."""

    @staticmethod
    def forward(ctx, x, residual, fork: bool):
        ctx.set_materialize_grads(False)
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        mask = torch.empty(x.numel() // 16, dtype=torch.int16)
        threads = torch.get_num_threads()
        library().relu_forward(_ptr(x), _ptr(residual), n * h * w, c, _ptr(y), _ptr(mask), threads)
        ctx.save_for_backward(mask)
        ctx.has_residual = residual is not None
        return _forked(y, fork)

    @staticmethod
    def backward(ctx, grad_y, grad_twin=None, _grad_x_twin=None):
        (mask,) = ctx.saved_tensors
        grad_y, grad_twin = _output_grads(grad_y, grad_twin)
        if grad_y is None:
            return None, None, None
        g = torch.empty_like(grad_y)
        threads = torch.get_num_threads()
        library().relu_backward(
            _ptr(grad_y), _ptr(grad_twin), _ptr(mask), grad_y.numel(), _ptr(g), threads
        )
        return g, (g if ctx.has_residual else None), None


class _ConvAddReLU(torch.autograd.Function):
    """relu(conv(x) + bias + residual?) as one oneDNN convolution with the add and the ReLU
    as post-ops, for the attack passes' blocks (batch norm folded into the conv's weight and
    bias): no pass over memory of their own. Input gradients only: folded weights are
    constants. The backward takes the ReLU mask from y, which the next layer keeps anyway."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, fork: bool):
        ctx.set_materialize_grads(False)
        conv = (weight, bias, padding, stride, [1, 1], 1)
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, *conv, "relu", [], "")
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, *conv, "add", 1.0, "relu", [], ""
            )
        ctx.save_for_backward(x, weight, y)
        ctx.conv = (stride, padding)
        ctx.has_residual = residual is not None
        return _forked(y, fork)

    @staticmethod
    def backward(ctx, grad_y, grad_twin=None, _grad_x_twin=None):
        x, weight, y = ctx.saved_tensors
        grad_y, grad_twin = _output_grads(grad_y, grad_twin)
        if grad_y is None:
            return (None,) * 7
        g = torch.empty_like(y)
        threads = torch.get_num_threads()
        library().relu_backward_from_output(
            _ptr(grad_y), _ptr(grad_twin), _ptr(y), y.numel(), _ptr(g), threads
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            stride, padding = ctx.conv
            grad_x = torch.ops.aten.convolution_backward(
                g, x, weight, None, stride, padding, [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        return grad_x, None, None, (g if ctx.has_residual else None), None, None, None


class FrozenBatchNorm2d(nn.Module):
    """An eval-mode ``BatchNorm2d`` as the constant per-channel map it is, ``x * scale +
    shift``, for the attack passes (:class:`actrain.runtime.AttackView` puts it where a batch
    norm cannot be folded into a conv, e.g. after a pre-activation block's residual add, and
    refreshes ``scale`` and ``shift`` from the model's batch norm). Constants: input
    gradients only."""

    fused_kernels = True

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("shift", torch.zeros(num_features))

    @torch.no_grad()
    def refresh_from(self, bn: nn.BatchNorm2d) -> None:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        self.scale.copy_(scale)
        self.shift.copy_(bn.bias - bn.running_mean * scale)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1, 1, 1)
        return (x.float() * self.scale.view(shape) + self.shift.view(shape)).to(x.dtype)


class _AffineAct(torch.autograd.Function):
    """relu?(x * scale + shift) for bf16 channels_last x (:class:`FrozenBatchNorm2d`); the
    backward reads a one-bit mask."""

    @staticmethod
    def forward(ctx, x, scale, shift, relu: bool, fork: bool, twin_input: bool):
        ctx.set_materialize_grads(False)
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        mask = torch.empty(x.numel() // 16, dtype=torch.int16) if relu else None
        threads = torch.get_num_threads()
        library().affine_forward(
            _ptr(x), n * h * w, c, _ptr(scale), _ptr(shift), _ptr(y), _ptr(mask), threads
        )
        ctx.save_for_backward(mask, scale)
        return _forked(y, fork, x if twin_input else None)

    @staticmethod
    def backward(ctx, grad_y, grad_twin=None, grad_x_twin=None):
        mask, scale = ctx.saved_tensors
        grad_y, grad_twin = _output_grads(grad_y, grad_twin)
        grad_x_twin = _kernel_grad(grad_x_twin)
        if grad_y is None:
            return grad_x_twin, None, None, None, None, None
        n, c, h, w = grad_y.shape
        dx = torch.empty_like(grad_y)
        library().affine_backward(
            _ptr(grad_y), _ptr(grad_twin), _ptr(mask), n * h * w, c, _ptr(scale), _ptr(dx),
            _ptr(grad_x_twin), torch.get_num_threads(),
        )  # fmt: skip
        return dx, None, None, None, None, None


def _forked(y: Tensor, fork: bool, x: Tensor | None = None) -> Tensor | tuple:
    """y, or y with twins sharing memory: of y (``fork``) and of the input ``x`` (given),
    further outputs of the same autograd node, whose gradients reach its backward apart."""
    if not fork and x is None:
        return y
    return y, (y.detach() if fork else None), (None if x is None else x.detach())


def _twin_of(out: Tensor | tuple) -> Tensor:
    """y, carrying its twins for :func:`shortcut_input` and :func:`input_twin`."""
    if not isinstance(out, tuple):
        return out
    y, y_twin, x_twin = out
    if y_twin is not None:
        y._shortcut_twin = y_twin
    if x_twin is not None:
        y._input_twin = x_twin
    return y


def _kernel_grad(g: Tensor | None) -> Tensor | None:
    """A gradient as the kernels read it: bf16 channels_last (None stays None)."""
    return None if g is None else g.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _output_grads(
    grad_y: Tensor | None, grad_twin: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of y and of its twin for the kernels (None where one is unused): the one
    the kernels read first is never None unless both are."""
    grad_y, grad_twin = _kernel_grad(grad_y), _kernel_grad(grad_twin)
    return (grad_twin, None) if grad_y is None else (grad_y, grad_twin)


def input_twin(out: Tensor, x: Tensor) -> Tensor:
    """``x`` for a pre-activation block's identity shortcut, where ``out = bn_act(bn, x,
    twin_input=True)``: the twin of ``x`` that the fused kernel left on ``out`` (whose
    gradient its backward adds to x's in the same pass), else ``x`` itself."""
    if isinstance(out, Tensor) and not torch.compiler.is_compiling():
        return getattr(out, "_input_twin", x)
    return x


def shortcut_input(x: Tensor) -> Tensor:
    """What a residual block's shortcut should read of its input ``x``: the twin that
    :func:`bn_act` (``fork=True``) gave it, else ``x`` itself. Same values either way."""
    if isinstance(x, Tensor) and not torch.compiler.is_compiling():
        return getattr(x, "_shortcut_twin", x)
    return x


def _tensors_fit(x: object, residual: object) -> bool:
    """bf16 channels_last CPU activations in eager mode, and a residual like x (or none)."""
    return (
        isinstance(x, Tensor)  # not an fx Proxy: AttackView traces the model (plain path)
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.shape[1] % 16 == 0  # the kernels work on 16 channels at a time
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
        and (
            residual is None
            or (
                isinstance(residual, Tensor)
                and residual.dtype == torch.bfloat16
                and residual.shape == x.shape
                and residual.is_contiguous(memory_format=torch.channels_last)
            )
        )
    )


def _training_batch_norm(bn: nn.Module, x: Tensor) -> bool:
    """A BatchNorm2d in training mode that updates fp32 running statistics, as the kernel does."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and bn.weight.dtype == torch.float32
        and bn.running_mean.dtype == torch.float32
        and bn.weight.device.type == "cpu"
        and x.shape[0] * x.shape[2] * x.shape[3] > 1
    )


def bn_act(
    bn: nn.Module,
    x: Tensor,
    residual: Tensor | None = None,
    relu: bool = True,
    fork: bool = False,
    twin_input: bool = False,
) -> Tensor:
    """``relu(bn(x) + residual)`` (without ReLU if not ``relu``; without the add if no
    ``residual``): the fused kernels where they apply, the plain ops everywhere else.

    ``fork``: the output feeds a residual block, which uses it twice (its first conv and its
    shortcut). On the fused path it then carries a twin for the shortcut
    (:func:`shortcut_input`), so that the backward receives the two gradients apart and sums
    them inside its own pass instead of autograd summing them in a pass of its own.
    ``twin_input``: the same for the input ``x`` of a pre-activation block, which its identity
    shortcut reads too (:func:`input_twin`); the batch-norm kernels only."""
    if getattr(bn, "fused_kernels", False) and _tensors_fit(x, residual) and library() is not None:
        if _training_batch_norm(bn, x):
            bn.__dict__["fused_kernels_ran"] = True  # (plain attribute: no Module bookkeeping)
            args = (x, bn.weight, bn.bias, residual, bn, relu, fork, twin_input)
            return _twin_of(_BatchNormAct.apply(*args))
        if relu and type(bn) is nn.Identity:  # batch norm folded away (runtime.AttackView)
            return _twin_of(_AddReLU.apply(x, residual, fork))
        if type(bn) is FrozenBatchNorm2d and residual is None:  # not foldable (AttackView)
            args = (x, bn.scale, bn.shift, relu, fork, twin_input)
            return _twin_of(_AffineAct.apply(*args))
    out = bn(x)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def conv_bn_act(
    conv: nn.Module,
    bn: nn.Module,
    x: Tensor,
    residual: Tensor | None = None,
    fork: bool = False,
) -> Tensor:
    """``bn_act(bn, conv(x), residual, fork=fork)``; in the attack passes, where batch norm is
    folded into ``conv`` (:class:`actrain.runtime.AttackView`), one oneDNN call."""
    if (
        type(bn) is nn.Identity
        and getattr(bn, "fused_kernels", False)
        and isinstance(x, Tensor)  # not an fx Proxy (AttackView traces the plain path)
        and not torch.compiler.is_compiling()
    ):
        xb = x.to(torch.bfloat16) if _autocast_bf16() else x
        if _conv_fuses(conv, xb, residual) and library() is not None:
            stride, padding = list(conv.stride), list(conv.padding)
            y = _ConvAddReLU.apply(xb, conv.weight, conv.bias, residual, stride, padding, fork)
            return _twin_of(y)
    return bn_act(bn, conv(x), residual, fork=fork)


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _conv_fuses(conv: nn.Module, x: object, residual: object) -> bool:
    """A plain 2-D convolution with constant bf16 weights and bias (folded), on bf16
    channels_last CPU activations, that ``actrain.im2col`` does not take over."""
    from actrain.im2col import Im2colConv2d, im2col_pays
    from actrain.runtime import cpu_runs_bf16

    if type(conv) not in (nn.Conv2d, Im2colConv2d) or conv.bias is None:
        return False
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return False
    if conv.weight.requires_grad or conv.weight.dtype != torch.bfloat16:
        return False
    if conv.bias.dtype != torch.bfloat16 or conv.out_channels % 16:
        return False
    if not conv.weight.is_contiguous(memory_format=torch.channels_last):
        return False  # (a 1x1 activation passes for channels_last whatever its model's layout)
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise") or not cpu_runs_bf16():
        return False
    if not (
        isinstance(x, Tensor)
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
    ):
        return False
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    out_h, out_w = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    if type(conv) is Im2colConv2d and conv.kernel_size == (3, 3):
        if im2col_pays(x.shape[1], out_h, out_w, sh):
            return False
    out_shape = (x.shape[0], conv.out_channels, out_h, out_w)
    return residual is None or (
        isinstance(residual, Tensor)
        and residual.dtype == torch.bfloat16
        and tuple(residual.shape) == out_shape
        and residual.is_contiguous(memory_format=torch.channels_last)
    )


def amx_weight_grad_fits(x: Tensor, grad_out: Tensor, weight: Tensor, stride: int = 1) -> bool:
    """The convs :func:`amx_weight_grad` takes: 3x3, padding 1, stride 1 or 2 (even input
    size), multiples of 16 channels in and out, an input width that divides 32 or that 32
    divides, bf16 channels_last CPU tensors, on a CPU with AMX."""
    from actrain.runtime import cpu_has_amx

    if x.dim() != 4 or weight.dim() != 4 or stride not in (1, 2):
        return False
    n, c, h, w = x.shape
    o = weight.shape[0]
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    return (
        tuple(weight.shape) == (o, c, 3, 3)
        and c % 16 == 0
        and o % 16 == 0
        and (32 % w == 0 or w % 32 == 0)
        and ((h * w) % 32 == 0 or ((h * w) % 16 == 0 and n % 2 == 0))
        and (stride == 1 or (h % 2 == 0 and w % 2 == 0 and w >= 4))
        and tuple(grad_out.shape) == (n, o, out_h, out_w)
        and all(
            t.device.type == "cpu"
            and t.dtype == torch.bfloat16
            and t.is_contiguous(memory_format=torch.channels_last)
            for t in (x, grad_out)
        )
        and cpu_has_amx()
        and library() is not None
    )


def amx_weight_grad(x: Tensor, grad_out: Tensor, stride: int = 1) -> Tensor | None:
    """The weight gradient of a conv that :func:`amx_weight_grad_fits`, in fp32 (O, I, 3, 3)
    laid out channels_last (as the models' parameters are), from the AMX kernels of
    ``fused_bn.c``; None where they cannot run (no AMX in the build or no permission from the
    OS), so that the caller falls back to oneDNN."""
    n, c, h, w = x.shape
    o = grad_out.shape[1]
    lib, threads = library(), torch.get_num_threads()
    out = torch.empty(3, 3, c, o)  # [kh][kw][i][o]
    if stride == 1 and c == o == 16 and w == 32:  # the first kernel, written for this shape
        status = lib.wgrad3x3_c16(_ptr(x), _ptr(grad_out), n, h, _ptr(out), threads)
    else:
        status = lib.wgrad3x3(_ptr(x), _ptr(grad_out), n, h, w, c, o, stride, _ptr(out), threads)
    if status:
        return None
    grad = torch.empty(o, 3, 3, c)
    lib.transpose_f32(_ptr(out), _ptr(grad), 9 * c, o)
    return grad.permute(0, 3, 1, 2)


def use_fused_bn(model: nn.Module, on: bool = True) -> int:
    """Let (or stop) ``model``'s ``BatchNorm2d`` layers take the fused kernels where
    :func:`bn_act` is called on them; returns how many layers that concerns."""
    count = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.fused_kernels = on
            count += 1
    return count


def fused_bn_active(model: nn.Module) -> bool:
    return available() and any(getattr(m, "fused_kernels", False) for m in model.modules())


def fused_bn_ran(model: nn.Module) -> bool:
    """Whether ``model``'s training-mode batch norm has run through the kernels, not only been
    switched on: torchvision's ResNet-50 calls its BN layers itself, never :func:`bn_act`."""
    return fused_bn_active(model) and any(
        m.__dict__.get("fused_kernels_ran", False) for m in model.modules()
    )
