"""Micro-benchmarks behind the notes in benchmarks/README.md (one thread, process CPU time).

python benchmarks/micro.py profile 16   # op breakdown of a bf16 channels_last train pass
python benchmarks/micro.py compile 16   # train fwd/bwd, eager vs torch.compile
python benchmarks/micro.py conv         # oneDNN 3x3 convs vs im2col + matmul, per shape
python benchmarks/micro.py fold 16      # attack pass, folded weights stored fp32 vs bf16
python benchmarks/micro.py wgrad 16     # weight gradients: oneDNN vs one matmul, per conv shape
python benchmarks/micro.py toggle fork 16   # ACT and Madry steps with/without one lever:
                                            # fork, convfuse, wgrad, bf16cvt, projbn,
                                            # amxwgrad, pwdgrad (lever())
python benchmarks/micro.py wgradshare 16  # a train pass with/without the weight gradients
python benchmarks/micro.py trainprofile 16  # op breakdown of a trainer's train pass, per pass
python benchmarks/micro.py bandwidth    # one core's copy bandwidth, L2 / L3 / memory sizes
python benchmarks/micro.py trainpass amxwgrad 16  # a train pass with/without one lever
python benchmarks/micro.py kernels      # batch-norm kernels, with/without AVX512-BF16, warm/cold
python benchmarks/micro.py fusedbn      # BN + add + ReLU: plain ops vs actrain.fused, per shape
python benchmarks/micro.py ratio 16     # ACT vs Madry, interleaved, with/without the attack fusion
python benchmarks/micro.py convpasses 16  # 3x3 convs: forward, input and weight gradient, GFLOP/s
python benchmarks/micro.py twothreads 16  # two cores: one model or half a batch per core
python benchmarks/micro.py optim 16     # SGD step: foreach vs fused
python benchmarks/micro.py stride2 16   # stride-2 convs' input gradient: oneDNN vs 4 stride-1 convs
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from actrain.models import create_model
from actrain.runtime import AttackView

BATCH = 128


def cpu_ms(
    fn: Callable[[], object], reps: int = 5, before: Callable[[], object] | None = None
) -> float:
    """Median process CPU time of ``fn`` after one warm-up call (``before`` each, untimed)."""
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return 1000 * sorted(times)[reps // 2]


def resnet(width: int) -> torch.nn.Module:
    model = create_model("resnet18", num_classes=10, width=width)
    return model.to(memory_format=torch.channels_last)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(BATCH, 3, 32, 32).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (BATCH,))


def train_pass(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    x, y = batch()

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()

    return run


def profile(width: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = train_pass(resnet(width))
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def compiled(width: int) -> None:
    model = resnet(width)
    print(f"width {width} eager: {cpu_ms(train_pass(model)):.0f} ms per train fwd/bwd")
    fast = train_pass(torch.compile(model))
    t = time.perf_counter()
    fast()
    print(f"compile: {time.perf_counter() - t:.0f} s; compiled: {cpu_ms(fast):.0f} ms")


def conv() -> None:
    from actrain.im2col import im2col_conv3x3

    fmt = torch.channels_last
    for c, s in [(64, 32), (128, 16), (256, 8), (512, 4)]:
        x = torch.randn(BATCH, c, s, s, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        w = torch.randn(c, c, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        go = torch.randn(BATCH, c, s, s, dtype=torch.bfloat16).contiguous(memory_format=fmt)

        def backward(mask: list[bool]) -> Callable[[], object]:
            args = (go, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
            return lambda: torch.ops.aten.convolution_backward(*args)

        def ours_fwd_bwd() -> None:
            xs, ws = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
            torch.autograd.grad(im2col_conv3x3(xs, ws), (xs, ws), go)

        fwd = cpu_ms(lambda: im2col_conv3x3(x, w))
        print(
            f"{c} channels {s}x{s}: oneDNN fwd {cpu_ms(lambda: F.conv2d(x, w, padding=1)):.1f}"
            f" bwd-input {cpu_ms(backward([True, False, False])):.1f}"
            f" bwd-weight {cpu_ms(backward([False, True, False])):.1f}"
            f" bwd {cpu_ms(backward([True, True, False])):.1f} ms |"
            f" im2col+mm fwd {fwd:.1f} bwd {cpu_ms(ours_fwd_bwd) - fwd:.1f}"
        )


def shapes() -> None:
    from actrain.im2col import im2col_conv3x3

    fmt = torch.channels_last
    for c_in, c_out, s, n, stride in [
        (128, 128, 4, 128, 1),
        (256, 256, 4, 128, 1),
        (384, 384, 4, 128, 1),
        (512, 512, 4, 128, 1),
        (512, 512, 4, 32, 1),
        (512, 512, 7, 32, 1),
        (512, 512, 8, 128, 1),
        (640, 640, 8, 128, 1),
        (320, 320, 16, 128, 1),
        (160, 160, 32, 128, 1),
        (64, 128, 8, 128, 2),
        (128, 256, 8, 128, 2),
        (192, 384, 8, 128, 2),
        (256, 512, 8, 128, 2),
        (128, 256, 16, 128, 2),
    ]:
        x = torch.randn(n, c_in, s, s, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        w = torch.randn(c_out, c_in, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        x.requires_grad_(True)
        w.requires_grad_(True)

        def fwd_bwd(conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
            def once() -> None:
                out = conv(x, w)  # noqa: B023
                torch.autograd.grad(out, (x, w), torch.ones_like(out))  # noqa: B023

            return cpu_ms(once, 3)

        ref = fwd_bwd(lambda a, b: F.conv2d(a, b, stride=stride, padding=1))  # noqa: B023
        ours = fwd_bwd(lambda a, b: im2col_conv3x3(a, b, None, stride))  # noqa: B023
        print(
            f"{c_in} -> {c_out} ch {s}x{s} stride {stride} batch {n}: oneDNN {ref:.1f} ms,"
            f" im2col {ours:.1f} ms, ratio {ours / ref:.2f}"
        )


def wgrad(width: int) -> None:
    """oneDNN's bf16 weight gradient against ``actrain.im2col``'s matmul over the patches (and
    ``actrain.fused``'s AMX kernel where it applies), for every conv shape of ResNet-18 at
    ``width`` (the rule ``weight_grad_by_matmul``)."""
    from actrain import fused
    from actrain.im2col import _cols

    w, fmt = width, torch.channels_last
    shapes = [  # c_in, c_out, input size, stride, kernel
        (3, w, 32, 1, 3), (w, w, 32, 1, 3), (w, 2 * w, 32, 2, 3), (2 * w, 2 * w, 16, 1, 3),
        (w, 2 * w, 32, 2, 1), (2 * w, 4 * w, 16, 2, 3), (4 * w, 4 * w, 8, 1, 3),
        (2 * w, 4 * w, 16, 2, 1), (4 * w, 8 * w, 8, 2, 3), (8 * w, 8 * w, 4, 1, 3),
        (4 * w, 8 * w, 8, 2, 1),
    ]  # fmt: skip
    for c_in, c_out, size, s, k in shapes:
        x = torch.randn(BATCH, c_in, size, size, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        wt = torch.randn(c_out, c_in, k, k, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        out = (size - 1) // s + 1
        g = torch.randn(BATCH, c_out, out, out, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        args = (g, x, wt, None, [s, s], [k // 2] * 2, [1, 1], False, [0, 0], 1)

        def matmul() -> torch.Tensor:
            gm = g.permute(0, 2, 3, 1).reshape(-1, c_out)  # noqa: B023
            if k == 3:  # noqa: B023
                cols = _cols(x, s, reuse=True)  # noqa: B023
            else:
                cols = x[:, :, ::s, ::s].permute(0, 2, 3, 1).reshape(-1, c_in)  # noqa: B023
            return torch.mm(cols.t(), gm)

        onednn = cpu_ms(lambda: torch.ops.aten.convolution_backward(*args, [False, True, False]))  # noqa: B023
        amx = ""
        if k == 3 and fused.amx_weight_grad_fits(x, g, wt, s):
            amx = f", AMX kernel {cpu_ms(lambda: fused.amx_weight_grad(x, g, s)):.2f} ms"  # noqa: B023
        print(
            f"{c_in} -> {c_out} ch {k}x{k} stride {s}, {out}x{out} out: weight gradient oneDNN"
            f" {onednn:.2f} ms, matmul {cpu_ms(matmul):.2f} ms{amx}"
        )


def fusedbn() -> None:
    from actrain.fused import bn_act, use_fused_bn

    fmt = torch.channels_last
    for c, s in [(16, 32), (32, 16), (64, 8), (128, 4), (64, 32), (512, 4)]:
        x0 = torch.randn(BATCH, c, s, s).to(torch.bfloat16).contiguous(memory_format=fmt)
        r0, g = torch.randn_like(x0), torch.randn_like(x0)
        times = []
        for on in (False, True):
            bn = torch.nn.BatchNorm2d(c)
            use_fused_bn(bn, on)

            def fwd_bwd() -> None:
                x, r = x0.detach().requires_grad_(True), r0.detach().requires_grad_(True)
                bn_act(bn, x, r).backward(g)  # noqa: B023

            times.append(cpu_ms(fwd_bwd, 9))
        print(
            f"{c} channels {s}x{s}: relu(bn(x) + r) fwd+bwd, plain ops {times[0]:.2f} ms,"
            f" fused {times[1]:.2f} ms"
        )


def ratio(width: int, rounds: int = 5) -> None:
    """ACT/Madry with and without the attack passes' fusions (conv + add + ReLU as one oneDNN
    call, else the add + ReLU kernel; the train-mode fused batch norm stays on in both): a
    faster attack raises the ratio."""
    from actrain import bench, fused

    specs = [
        bench.BenchSpec(method=m, width=width, threads=1, clock="cpu") for m in ("act", "madry")
    ]
    real = fused._AddReLU.apply, fused._conv_fuses
    plain = lambda x, r, fork: F.relu(x if r is None else x + r)  # noqa: E731
    for attack_fusion in (False, True):
        fused._AddReLU.apply = real[0] if attack_fusion else plain
        fused._conv_fuses = real[1] if attack_fusion else (lambda *args: False)
        act, madry = bench.interleaved_step_ms(specs, rounds)
        print(
            f"width {width}, attack-pass conv + add + ReLU fused: {attack_fusion}: ACT {act:.0f}"
            f" ms, Madry {madry:.0f} ms, ACT/Madry {act / madry:.3f}"
        )
    fused._AddReLU.apply, fused._conv_fuses = real


def portable_kernels() -> object:
    """``actrain.fused``'s kernels built without AVX512-BF16: bf16 rounding by integer ops."""
    from actrain import fused

    if "portable" not in _REAL:
        _REAL["portable"] = fused.load((*fused.CFLAGS, "-mno-avx512bf16"))
    return _REAL["portable"]


def lever(name: str, on: bool) -> None:
    """Switch one of the fused paths on or off in this process: ``fork`` (a block input's two
    gradients summed inside the fused backward), ``convfuse`` (attack passes' conv + add +
    ReLU as one oneDNN call), ``wgrad`` (weight gradients as one matmul where oneDNN's are
    slow), ``bf16cvt`` (the kernels' bf16 rounding as one instruction, VCVTNEPS2BF16),
    ``amxwgrad`` (3x3 convs' weight gradients on AMX tiles; off: oneDNN's or the matmul),
    ``projbn`` (the projection shortcuts' batch norm through the fused kernel), ``pwdgrad``
    (1x1 strided convs' input gradient as one matmul; off: oneDNN's)."""
    from actrain import fused, im2col
    from actrain.models import resnet

    real = _REAL.setdefault(
        name,
        {
            "fork": fused._forked,
            "convfuse": fused._conv_fuses,
            "wgrad": im2col.weight_grad_by_matmul,
            "bf16cvt": fused.library,
            "projbn": resnet._ConvBN.forward,
            "amxwgrad": im2col.amx_weight_grad_pays,
            "pwdgrad": im2col.strided_pointwise_input_grad,
        }[name],
    )
    if name == "fork":
        fused._forked = real if on else (lambda y, fork, x=None: y)
    elif name == "convfuse":
        fused._conv_fuses = real if on else (lambda *args: False)
    elif name == "wgrad":
        im2col.weight_grad_by_matmul = real if on else (lambda *args: False)
    elif name == "bf16cvt":
        fused.library = real if on else portable_kernels
    elif name == "amxwgrad":  # off: oneDNN's weight gradients (or the matmul's) again
        im2col.amx_weight_grad_pays = real if on else (lambda *args: False)
    elif name == "pwdgrad":
        im2col.strided_pointwise_input_grad = real if on else _onednn_pointwise_input_grad
    else:
        resnet._ConvBN.forward = real if on else torch.nn.Sequential.forward


def _onednn_pointwise_input_grad(g, weight, input_shape, stride):
    # oneDNN reads only the input's shape and layout for the input gradient
    x = torch.empty(input_shape, dtype=g.dtype, memory_format=torch.channels_last)
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, [stride] * 2, [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
    )[0]


def _trainer_pass(width: int) -> tuple[Callable[[], None], torch.nn.Module]:
    """A trainer's G train pass (fused kernels and all) with the caches evicted before it, as
    in a step, where a block's saved activations come back from memory; and G."""
    from actrain import bench

    trainer = bench.synthetic_trainer(bench.BenchSpec(method="madry", width=width).train_config())
    g = trainer.train_models["g"].train()
    x, y = next(bench.endless_batches(trainer.data.train))
    evict = torch.empty(64 * 2**20)

    def train_pass() -> None:
        with trainer.autocast():
            out = g(x)
        F.cross_entropy(out.float(), y).backward()

    return lambda: cpu_ms(train_pass, 9, before=lambda: evict.add_(1)), g


def trainprofile(width: int) -> None:
    """Op breakdown of a trainer's G train pass (fused kernels and all), caches evicted before
    each pass as in a step; per pass."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from actrain import bench

    trainer = bench.synthetic_trainer(bench.BenchSpec(method="madry", width=width).train_config())
    g = trainer.train_models["g"].train()
    x, y = next(bench.endless_batches(trainer.data.train))
    evict = torch.empty(64 * 2**20)

    def train_pass() -> None:
        g.zero_grad(set_to_none=True)
        with trainer.autocast():
            out = g(x)
        F.cross_entropy(out.float(), y).backward()

    for _ in range(3):
        evict.add_(1)
        train_pass()
    passes = 5
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            evict.add_(1)  # (shows as aten::add_, one call per pass)
            train_pass()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    for e in rows:
        print(f"{e.key:40s} {e.self_cpu_time_total / 1000 / passes:7.1f} ms/pass"
              f" {e.count // passes:4d} calls/pass")  # fmt: skip


def bandwidth() -> None:
    """One core's copy bandwidth by size: L2-, L3- and memory-resident bf16 tensors."""
    for mb in (1, 4, 16, 64, 256):
        a = torch.randn(mb * 2**19).to(torch.bfloat16)
        b = torch.empty_like(a)
        ms = cpu_ms(lambda: b.copy_(a), reps=max(5, 256 // mb))  # noqa: B023
        print(f"{mb:4d} MB: copy {2 * mb / 1024 / (ms / 1000):5.1f} GB/s (read + write)")


def wgradshare(width: int) -> None:
    """A train pass with and without the convolutions' weight gradients: what they cost in
    place."""
    timed, g = _trainer_pass(width)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    for on in (True, False, True, False):
        for c in convs:
            c.weight.requires_grad_(on)
        print(f"width {width}, conv weight gradients {'on ' if on else 'off'}: {timed():.1f} ms")


def onepass(width: int) -> None:
    """A trainer's G train pass as in a step (see :func:`_trainer_pass`), all levers as set."""
    timed, _ = _trainer_pass(width)
    print(f"width {width}: {timed():.1f} ms per train pass (median of 9, caches evicted)")


def trainpass(name: str, width: int) -> None:
    """A train pass with one lever (see :func:`lever`) off, on, off, on."""
    timed, _ = _trainer_pass(width)
    for on in (False, True, False, True):
        lever(name, on)
        print(f"width {width}, {name} {'on ' if on else 'off'}: {timed():.1f} ms per train pass")
    lever(name, True)


def kernels() -> None:
    """The training-mode batch-norm kernels alone (with residual, ReLU and both gradient
    twins), built with and without AVX512-BF16, on warm caches and after evicting them (as in
    a training step, where a block's saved activations come back from memory)."""
    from actrain import fused

    builds = {"portable": portable_kernels(), "native": fused.library()}
    evict = torch.empty(64 * 2**20)
    for c, s in [(16, 32), (32, 16), (64, 8), (64, 32)]:
        m = BATCH * s * s
        x, res, dy, dy2, dxa, y, dz, dx = (torch.randn(m, c).bfloat16() for _ in range(8))
        mask = torch.empty(m * c // 16, dtype=torch.int16)
        w, b, rm, rv, mean, invstd, dw, db = (torch.ones(c) for _ in range(8))
        p = torch.Tensor.data_ptr
        for label, lib in builds.items():

            def fwd() -> None:
                lib.bn_forward(p(x), p(res), m, c, p(w), p(b), p(rm), p(rv), 0.1, 1e-5, p(y),  # noqa: B023
                               p(mask), p(mean), p(invstd), 1)  # noqa: B023  # fmt: skip

            def bwd() -> None:
                lib.bn_backward(p(dy), p(dy2), p(mask), p(x), m, c, p(w), p(mean), p(invstd),  # noqa: B023
                                p(dz), p(dx), p(dxa), p(dw), p(db), 1)  # noqa: B023  # fmt: skip

            out = [cpu_ms(fn, 15) for fn in (fwd, bwd)]
            out += [cpu_ms(fn, 15, before=lambda: evict.add_(1)) for fn in (fwd, bwd)]  # noqa: B023
            print(
                f"{c} channels {s}x{s}, {label}: forward {out[0]:.2f} ms warm, {out[2]:.2f} cold;"
                f" backward {out[1]:.2f} warm, {out[3]:.2f} cold"
            )


_REAL: dict[str, Callable] = {}


def toggle(name: str, width: int, rounds: int = 4) -> None:
    """ACT and Madry steps (one thread, CPU time, interleaved rounds in this process) with the
    lever off and on, twice each in alternation, so that drift shows as disagreement."""
    from actrain import bench

    specs = [
        bench.BenchSpec(method=m, width=width, threads=1, clock="cpu") for m in ("act", "madry")
    ]
    for on in (False, True, False, True):
        lever(name, on)
        act, madry = bench.interleaved_step_ms(specs, rounds)
        print(
            f"width {width}, {name} {'on ' if on else 'off'}: ACT {act:.0f} ms, Madry"
            f" {madry:.0f} ms, ACT/Madry {act / madry:.3f}",
            flush=True,
        )
    lever(name, True)


def fold(width: int, rounds: int = 15) -> None:
    model = resnet(width).eval()
    x, _ = batch()
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    views = {k: AttackView(model, dt).module.eval() for k, dt in dtypes.items()}

    def attack_pass(view: torch.nn.Module) -> None:
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = view(xx)
        torch.autograd.grad(out.float().sum(), xx)

    times: dict[str, list[float]] = {k: [] for k in views}
    for view in views.values():
        attack_pass(view)
    for _ in range(rounds):  # interleaved, so load changes hit both alike
        for k, view in views.items():
            t = time.process_time()
            attack_pass(view)
            times[k].append(time.process_time() - t)
    for k, ts in times.items():
        print(f"width {width}, folded weights {k}: {1000 * sorted(ts)[rounds // 2]:.1f} ms/pass")


def convpasses(width: int) -> None:
    """Forward, input gradient (oneDNN) and weight gradient (actrain's AMX kernel) of every
    3x3 conv shape of ResNet-18 at ``width``, warm, in ms and GFLOP/s: where the train pass's
    extra pass (the weight gradient) stands against the passes an attack pass also runs."""
    from actrain import fused

    w, fmt = width, torch.channels_last
    shapes = [(w, w, 32, 1), (w, 2 * w, 32, 2), (2 * w, 2 * w, 16, 1), (2 * w, 4 * w, 16, 2),
              (4 * w, 4 * w, 8, 1), (4 * w, 8 * w, 8, 2), (8 * w, 8 * w, 4, 1)]  # fmt: skip
    for c_in, c_out, size, s in shapes:
        x = torch.randn(BATCH, c_in, size, size, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        wt = torch.randn(c_out, c_in, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        out = (size - 1) // s + 1
        g = torch.randn(BATCH, c_out, out, out, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        args = (g, x, wt, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])
        mflop = 2 * BATCH * out * out * c_in * c_out * 9 / 1e6
        times = {
            "forward": cpu_ms(lambda: F.conv2d(x, wt, None, s, 1), 9),  # noqa: B023
            "input grad": cpu_ms(lambda: torch.ops.aten.convolution_backward(*args), 9),  # noqa: B023
        }
        if fused.amx_weight_grad_fits(x, g, wt, s):
            times["AMX weight grad"] = cpu_ms(lambda: fused.amx_weight_grad(x, g, s), 9)  # noqa: B023
        cells = ", ".join(f"{k} {t:.2f} ms ({mflop / t:.0f} GFLOP/s)" for k, t in times.items())
        print(f"{c_in} -> {c_out} ch, {size}x{size}, stride {s} ({mflop:.0f} MFLOP): {cells}")


def twothreads(width: int, rounds: int = 6) -> None:
    """Two ways to use this CPU's two cores inside one step, against intra-op threads (both
    cores on each op, the default): F's and G's backward side by side on one thread each, and
    the attack's batch in two halves on one thread each (exact: attack passes are per
    example). Wall time, medians of ``rounds``."""
    import threading

    from actrain import bench
    from actrain.runtime import attack_model

    torch.set_num_threads(2)
    trainer = bench.synthetic_trainer(bench.BenchSpec(method="act", width=width).train_config())
    models, method, attack = trainer.train_models, trainer.method, trainer.train_attack
    x, y = next(bench.endless_batches(trainer.data.train))

    def beside(jobs: list[Callable[[], object]]) -> None:
        """Each job on its own thread with one intra-op thread (an OpenMP setting per thread)."""

        def one(job: Callable[[], object]) -> None:
            torch.set_num_threads(1)
            job()

        side = [threading.Thread(target=one, args=(j,)) for j in jobs[1:]]
        for t in side:
            t.start()
        one(jobs[0])
        for t in side:
            t.join()
        torch.set_num_threads(2)

    def losses() -> dict[str, torch.Tensor]:
        for m in models.values():
            m.train()
            m.zero_grad(set_to_none=True)
        with trainer.autocast():
            ctx = method.prepare(models, x, y)
            return method.losses(models, x, x, y, ctx).losses

    g = attack_model(trainer.models["g"], trainer.fold_bn, trainer.precision)
    with torch.no_grad(), trainer.autocast():
        ref = method.prepare(models, x, y)["logits_f"]  # F(x), the attack's KL target
    halves = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]

    def perturb(part: slice) -> torch.Tensor:
        objective = trainer._attack_objective({"logits_f": ref[part]}, y[part])
        return attack.perturb(g, x[part], objective, trainer.autocast)

    timed: dict[str, Callable[[], Callable[[], object]]] = {  # setup (untimed) -> timed part
        "backward of G and F, both cores each": lambda: sum(losses().values()).backward,
        "backward of G and F, one core each": lambda: functools.partial(
            beside, [v.backward for v in losses().values()]
        ),
        "attack on the batch, both cores": lambda: functools.partial(perturb, slice(None)),
        "attack in two halves, one core each": lambda: functools.partial(
            beside, [functools.partial(perturb, h) for h in halves]
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in timed}
    for r in range(rounds + 1):
        for k, setup in timed.items():
            run = setup()
            t = time.perf_counter()
            run()
            if r:
                times[k].append(1000 * (time.perf_counter() - t))
    for k, ts in times.items():
        print(f"width {width}, {k}: {sorted(ts)[rounds // 2]:.1f} ms")


def optim(width: int) -> None:
    """One SGD step (momentum, weight decay) over ResNet-18's parameters at ``width``: the
    default implementation (foreach), and the fused kernel (equal within float rounding)."""
    import copy

    model = resnet(width)
    for kind in ("foreach", "fused"):
        params = list(copy.deepcopy(model).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, **{kind: True})
        print(f"width {width}, SGD {kind}: {cpu_ms(opt.step, 21):.2f} ms/step")


def stride2(width: int) -> None:
    """The input gradient of ResNet-18's 3x3 stride-2 convs: oneDNN's, and as four stride-1
    convs of dy (one per parity of the input position: 1x1, 1x2, 2x1 and 2x2 taps) written
    into every other row and column."""
    fmt = torch.channels_last

    def subpixel(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, _, ho, wo = dy.shape
        wt = weight.transpose(0, 1)

        def taps(rows: list[int], cols: list[int]) -> torch.Tensor:
            return wt[:, :, rows][:, :, :, cols].contiguous(memory_format=fmt)

        out = torch.empty(n, ho, 2, wo, 2, wt.shape[0], dtype=dy.dtype)
        out[:, :, 0, :, 0] = F.conv2d(dy, taps([1], [1])).permute(0, 2, 3, 1)
        out[:, :, 0, :, 1] = F.conv2d(dy, taps([1], [2, 0]), padding=(0, 1))[..., 1:].permute(
            0, 2, 3, 1
        )
        out[:, :, 1, :, 0] = F.conv2d(dy, taps([2, 0], [1]), padding=(1, 0))[:, :, 1:].permute(
            0, 2, 3, 1
        )
        out[:, :, 1, :, 1] = F.conv2d(dy, taps([2, 0], [2, 0]), padding=1)[:, :, 1:, 1:].permute(
            0, 2, 3, 1
        )
        return out.view(n, 2 * ho, 2 * wo, -1).permute(0, 3, 1, 2)

    for c_in, c_out, size in [(width, 2 * width, 32), (2 * width, 4 * width, 16),
                              (4 * width, 8 * width, 8)]:  # fmt: skip
        x = torch.randn(BATCH, c_in, size, size, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        wt = torch.randn(c_out, c_in, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        g = torch.randn(BATCH, c_out, size // 2, size // 2, dtype=torch.bfloat16)
        g = g.contiguous(memory_format=fmt)
        args = (g, x, wt, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])
        ref = torch.ops.aten.convolution_backward(*args)[0].float()
        err = (subpixel(g, wt).float() - ref).abs().max() / ref.abs().max()
        onednn = cpu_ms(lambda: torch.ops.aten.convolution_backward(*args), 9)  # noqa: B023
        ours = cpu_ms(lambda: subpixel(g, wt), 9)  # noqa: B023
        print(
            f"{c_in} -> {c_out} ch, {size}x{size}: input gradient oneDNN {onednn:.2f} ms,"
            f" four stride-1 convs {ours:.2f} ms (largest difference {err:.1e} of the largest)"
        )


def fp32levers(width: int, rounds: int = 3) -> None:
    """fp32 ACT and Madry steps with channels_last and BN folding off/on, all eight in
    interleaved rounds (``bench.interleaved_step_ms``): what the fp32 levers buy on a CPU where
    fp32 is the default (no AVX512-BF16/AMX)."""
    from actrain import bench

    levers = [(cl, fold) for cl in (False, True) for fold in (False, True)]
    specs = [
        bench.BenchSpec(
            method=m,
            width=width,
            threads=1,
            clock="cpu",
            precision="fp32",
            channels_last=cl,
            fold_bn=fold,
        )
        for cl, fold in levers
        for m in ("act", "madry")
    ]
    ms = bench.interleaved_step_ms(specs, rounds, block=1)
    for i, (cl, fold) in enumerate(levers):
        act, madry = ms[2 * i], ms[2 * i + 1]
        print(
            f"width {width} fp32 channels_last={cl} fold={fold}: ACT {act:.0f} ms,"
            f" Madry {madry:.0f} ms, ACT/Madry {act / madry:.3f}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    what, *rest = sys.argv[1:] or ["profile"]
    if what in ("toggle", "trainpass"):
        {"toggle": toggle, "trainpass": trainpass}[what](rest[0], int(rest[1]) if rest[1:] else 16)
        sys.exit()
    width = int(rest[0]) if rest else 16
    if what in ("conv", "shapes", "fusedbn", "kernels", "bandwidth"):
        {"conv": conv, "shapes": shapes, "fusedbn": fusedbn, "kernels": kernels,
         "bandwidth": bandwidth}[what]()  # fmt: skip
    else:
        commands = {"profile": profile, "compile": compiled, "fold": fold, "ratio": ratio}
        commands["wgrad"], commands["wgradshare"] = wgrad, wgradshare
        commands["trainprofile"], commands["pass"] = trainprofile, onepass
        commands["convpasses"], commands["twothreads"] = convpasses, twothreads
        commands["optim"], commands["stride2"] = optim, stride2
        commands["fp32levers"] = fp32levers
        commands[what](width)
