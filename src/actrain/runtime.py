"""Device and numeric precision choices, resolved once per run."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import weakref
from collections.abc import Callable

import torch
import torch.fx

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        from actrain.config import ConfigError

        raise ConfigError(f"--device: unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from actrain.config import ConfigError

        raise ConfigError("--device: CUDA was requested but no GPU is available (use --device cpu)")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (this project's AMD EPYC has the latter): where bf16 autocast pays."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)


def cpu_has_amx() -> bool:
    """AMX tiles: the only CPU ``actrain.im2col``'s shape rule was measured on."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@functools.cache
def cpu_runs_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT). Without
    them PyTorch's own bf16 convolutions take a slow portable path, and oneDNN ops called
    directly (``actrain.fused``'s conv + add + ReLU) raise (AVX2-only CPUs)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def channels_last_fp32_hazard(model: torch.nn.Module) -> str | None:
    """The first conv whose fp32 channels_last weight gradient corrupts the heap on this CPU.

    Seen with torch 2.14.1 on an AVX2-only AMD EPYC: a 1x1 convolution with stride >= 2, no
    padding and 2 to 7 input channels (ResNet shortcuts below width 8) aborts the process
    ("double free or corruption") in its weight gradient; NCHW, AVX-512 CPUs and 8 or more
    channels are fine."""
    if platform.machine() not in ("x86_64", "AMD64") or _cpu_capability() == "AVX512":
        return None
    for name, m in model.named_modules():
        if (
            isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.stride != (1, 1)
            and m.padding in ((0, 0), "valid")
            and 1 < m.in_channels < 8
            and m.weight.requires_grad
        ):
            return f"{name} ({m.in_channels} input channels)"
    return None


def _cpu_capability() -> str:
    return str(torch.backends.cpu.get_cpu_capability())


def slow_bf16_note(device: torch.device, precision: str) -> str | None:
    """One line for a user who asked for bf16 on a CPU without oneDNN's bf16 kernels."""
    if device.type != "cpu" or precision != "bf16" or cpu_runs_bf16():
        return None
    return (
        "actrain: note: this CPU has no bf16 kernels in oneDNN (AVX2 only): bf16 runs PyTorch's"
        " portable path, about 10x slower than fp32 here (the default)"
    )


def refuse_cpu_fp16(precision: str, device: torch.device) -> None:
    """The commands' check (train, eval, bench) that fp16 was not asked for on a CPU.

    PyTorch runs fp16 autocast on a CPU through slow portable kernels (about 3 images/s
    training a ResNet-18 here), so a user asking for it almost certainly meant a GPU run. The
    library itself still takes fp16 on a CPU (its tests check the fp16 step there)."""
    if precision == "fp16" and device.type != "cuda":
        from actrain.config import ConfigError

        raise ConfigError(
            "--precision fp16: a GPU option; on a CPU PyTorch's fp16 is many times slower"
            " than fp32: use fp32 or bf16 there"
        )


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The reduced dtype autocast computes in for ``precision`` (None for fp32)."""
    return _AUTOCAST_DTYPES.get(precision)


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory so hot loops can open the same autocast context cheaply."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(
        torch.autocast, device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]
    )


# ---- attack passes with batch norm folded into the convolutions (issue 7) -----------------------

# Every batch norm: BatchNorm1d/2d/3d, and the synchronised ones of torchrun --sync-bn
# (torch's SyncBatchNorm, actrain.distributed.PortableSyncBatchNorm), which in eval mode are
# the same fixed affine map
_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
_CONV_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class _ConvLeafTracer(torch.fx.Tracer):
    """Convolutions and batch norms stay leaves even when subclassed or defined outside torch
    (``actrain.im2col.Im2colConv2d``, ``actrain.distributed.PortableSyncBatchNorm``)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _CONV_TYPES + _BN_TYPES) or super().is_leaf_module(m, qualname)


def _module_uses(graph: torch.fx.Graph) -> dict[str, int]:
    """How often each module is used in ``graph``: its ``call_module`` nodes, plus one for each
    ``get_attr`` of one of its parameters or buffers (its weight read directly elsewhere).

    A module shared between call sites (weight sharing) appears under one qualified name for all
    of them, so its count is above one."""
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
        elif node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            uses[owner] = uses.get(owner, 0) + 1
    return uses


def _affine_in_eval(bn: torch.nn.Module) -> bool:
    """A batch norm whose eval-mode map is fixed by its running statistics and affine terms."""
    return bn.track_running_stats and bn.running_mean is not None and bn.affine


class AttackView:
    """An eval-mode stand-in for ``model`` in attack passes, with every conv -> BN pair folded.

    PGD runs the model in eval mode, where batch norm is a fixed per-channel affine map; folding
    it into the preceding convolution's weight and bias removes the BN forward and backward from
    each of the K attack passes (on this project's CPU about 28% of an attack pass at ResNet-18
    width 16 and 10% at full width, in bf16). ``module`` is a shallow structural copy of the
    model: it shares every parameter and buffer with it except the folded convolutions, whose
    weight and bias are recomputed from the model's current weights and BN statistics by
    :meth:`refresh` (call it after each optimiser step; it returns ``module``). Nothing of the
    model itself is changed. Folded tensors do not require gradients; attacks take gradients
    w.r.t. the input only.

    ``dtype`` (the autocast dtype of the attack passes) stores the folded tensors already
    rounded to it: autocast caches its casts only for tensors that require gradients, so fp32
    folded weights would be cast again in every one of the K passes. Rounding once per refresh
    gives the same values the per-pass cast would.

    ``channels_last`` stores the folded weights channels_last and converts the input to it
    (:meth:`refresh` then returns that wrapper): for a model kept in NCHW, as evaluation gets it.
    """

    def __init__(
        self, model: torch.nn.Module, dtype: torch.dtype | None = None, channels_last: bool = False
    ) -> None:
        import copy

        traced = torch.fx.GraphModule(model, _ConvLeafTracer().trace(model))
        mods = dict(model.named_modules())
        self.pairs: list[tuple[str, str]] = []
        self.dtype = dtype
        calls = _module_uses(traced.graph)
        for node in traced.graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), _BN_TYPES):
                continue
            bn, src = mods[node.target], node.args[0]
            if (
                isinstance(src, torch.fx.Node)
                and src.op == "call_module"
                and isinstance(mods.get(src.target), _CONV_TYPES)
                and len(src.users) == 1
                # folding rewrites the module itself, so it must serve this one call site only:
                # a conv (or BN) shared with another call would change that call's result too
                and calls.get(src.target) == 1
                and calls.get(node.target) == 1
                and len(node.args) == 1
                and not node.kwargs
                and _affine_in_eval(bn)
            ):
                self.pairs.append((src.target, node.target))
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        self.module = copy.deepcopy(model, shared)
        view_mods = dict(self.module.named_modules())
        self._folds: list[tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]] = []
        for conv_name, bn_name in self.pairs:
            parent, _, attr = bn_name.rpartition(".")
            identity = torch.nn.Identity()
            # actrain.fused: the block's add + ReLU then take the fused kernel too
            identity.fused_kernels = getattr(mods[bn_name], "fused_kernels", False)
            setattr(view_mods[parent] if parent else self.module, attr, identity)
            conv, folded = mods[conv_name], view_mods[conv_name]
            fmt = torch.channels_last if channels_last and conv.weight.dim() == 4 else None
            folded.weight = torch.nn.Parameter(
                torch.empty_like(
                    conv.weight, dtype=self.dtype, memory_format=fmt or torch.preserve_format
                ),
                requires_grad=False,
            )
            bias = folded.weight.new_empty(conv.out_channels)
            folded.bias = torch.nn.Parameter(bias, requires_grad=False)
            self._folds.append((conv, mods[bn_name], folded))
        # actrain.fused: a batch norm that no conv precedes (a pre-activation block's first)
        # becomes its constant affine map, which the fused kernel applies with the ReLU
        from actrain.fused import FrozenBatchNorm2d

        folded_bns = {bn_name for _, bn_name in self.pairs}
        self._frozen: list[tuple[torch.nn.Module, FrozenBatchNorm2d]] = []
        for name, bn in mods.items():
            if (
                type(bn) is torch.nn.BatchNorm2d
                and name not in folded_bns
                and getattr(bn, "fused_kernels", False)
                and _affine_in_eval(bn)
            ):
                parent, _, attr = name.rpartition(".")
                frozen = FrozenBatchNorm2d(bn.num_features).to(bn.weight.device)
                setattr(view_mods[parent] if parent else self.module, attr, frozen)
                self._frozen.append((bn, frozen))
        self.entry = _ChannelsLastInput(self.module) if channels_last else self.module
        self.placement = _placement(model)  # of the folded copies: a moved model needs a new view
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        for conv, bn, folded in self._folds:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            folded.weight.copy_(conv.weight * scale.view(shape))
            shift = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            folded.bias.copy_(shift)
        for bn, frozen in self._frozen:
            frozen.refresh_from(bn)
        return self.entry


class _ChannelsLastInput(torch.nn.Module):
    """``module`` on a channels_last copy of its (4-d) input; gradients flow back unchanged."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x)


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fp32_levers_pay(device: torch.device) -> bool:
    """channels_last and BN folding in fp32 training: measured to pay on an AVX2-only x86 CPU,
    where fp32 is the default (ResNet-18, one thread: an ACT step 1.30x faster with both at
    width 16, 1.07x at full width; benchmarks/README.md, fifteenth session). Unmeasured in fp32
    elsewhere (AVX-512 CPUs train in bf16 by default), so the plain path stays there."""
    return (
        device.type == "cpu"
        and platform.machine() in ("x86_64", "AMD64")
        and _cpu_capability() == "AVX2"
    )


def fold_bn_default(precision: str, device: torch.device | None = None) -> bool:
    """Fold BN for attack passes by default wherever the attack already runs in reduced
    precision, and in fp32 where :func:`fp32_levers_pay`; elsewhere fp32 keeps the plain path,
    so its results stay bit-identical to it."""
    return precision != "fp32" or (device is not None and fp32_levers_pay(device))


def attack_model(
    model: torch.nn.Module, fold_bn: bool | None = None, precision: str = "fp32"
) -> torch.nn.Module:
    """The module PGD should run on for ``model``: the model itself, or (``fold_bn``, default
    :func:`fold_bn_default`) its refreshed :class:`AttackView`, built once per model and cached.
    Models that cannot be traced or have no conv -> BN pair are used as they are."""
    if fold_bn is None:
        fold_bn = fold_bn_default(precision, _placement(model)[0])
    if not fold_bn:
        return model
    return _cached_view(_VIEWS, model, autocast_dtype(precision), channels_last=False)


def _cached_view(
    cache: weakref.WeakKeyDictionary,
    model: torch.nn.Module,
    dtype: torch.dtype | None,
    channels_last: bool,
) -> torch.nn.Module:
    """``model``'s refreshed :class:`AttackView` from ``cache`` (built on first use), or the
    model itself where folding does not apply (untraceable, or no conv -> BN pair)."""
    entry = cache.get(model)
    # (view, fingerprint) where built here; a bare view where a Trainer set its own
    view, built_for = entry if isinstance(entry, tuple) else (entry, None)
    now = _fingerprint(model) if built_for is not None else None
    if (
        view is None
        or (built_for is not None and built_for != now)  # modules or parameters replaced
        or (view and (view.dtype != dtype or view.placement != _placement(model)))
    ):
        try:
            view = AttackView(model, dtype, channels_last)
        except Exception:  # untraceable model (data-dependent control flow): use it as it is
            view = False
        if view and not view.pairs:
            view = False
        cache[model] = (view, now if now is not None else _fingerprint(model))
    return view.refresh() if view else model


def _fingerprint(model: torch.nn.Module) -> tuple[int, ...]:
    """The identity of ``model``'s modules, parameters and buffers: a copy made before one of
    them was replaced (a new head, a reassigned Parameter) computes another function."""
    return (
        *(id(m) for m in model.modules()),
        *(id(p) for p in model.parameters()),
        *(id(b) for b in model.buffers()),
    )


def _placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``model``'s parameters (a view built for others is stale)."""
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return param.device, param.dtype


_EVAL_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_fold_bn_default(device: torch.device) -> bool:
    """Evaluation attacks take their gradients from the folded channels_last view wherever it
    was measured to pay: on a CPU (fp32 PGD, ResNet-18: 1.5-1.85x faster at width 16, 1.3x at
    full width) and on CUDA GPUs (1.57x at full width, batch 512, on an H200;
    docs/evaluation.md, ``actrain bench --eval``)."""
    return device.type in ("cpu", "cuda")


def gradient_model(
    model: torch.nn.Module, fold_bn: bool | None = None, precision: str = "fp32"
) -> torch.nn.Module:
    """The module whose input gradients steer an evaluation attack on ``model``: its
    :class:`AttackView` with channels_last weights (``fold_bn``, default
    :func:`eval_fold_bn_default`; folded weights stored in the attack's ``precision``),
    refreshed from the model's current weights; or the model.

    The same function up to float rounding, so the attack is as strong; evaluations still take
    every verdict (is this example misclassified?) from ``model`` itself."""
    if fold_bn is None:
        fold_bn = eval_fold_bn_default(_placement(model)[0])
    if not fold_bn:
        return model
    return _cached_view(_EVAL_VIEWS, model, autocast_dtype(precision), channels_last=True)


def use_attack_view(model: torch.nn.Module, view: AttackView | None) -> None:
    """Make :func:`attack_model` return ``view`` (or, with None, the model) for ``model``."""
    _VIEWS[model] = view if view is not None else False


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep the memory a training step frees for the next step (CPU runs).

    A step allocates and frees its activations. By default glibc gives large freed blocks back
    to the kernel, and the next step page-faults them in again: an fp32 ACT step at ResNet-18
    width 16 took 130,000-520,000 page faults and ~13 % longer (bf16 steps, half the bytes,
    a few thousand and no measurable cost). Blocks up to 32 MB now come from the heap, and up
    to 1 GB of free heap stays in the process. Left alone where the user set glibc's malloc
    variables or ``ACTRAIN_KEEP_FREED_MEMORY=0``. Returns whether it applied (Linux, glibc)."""
    env = os.environ
    if (
        platform.system() != "Linux"
        or env.get("ACTRAIN_KEEP_FREED_MEMORY", "1") == "0"
        or any(k.startswith("MALLOC_") for k in env)
        or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the fixed mmap threshold first: setting either turns off glibc's dynamic adjustment
    return mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1


def configure_threads(threads: int | None) -> int:
    """Set the intra-op thread count (None: leave PyTorch's default, one per core)."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
