"""The fused batch norm + add + ReLU kernels compute what nn.BatchNorm2d, + and F.relu do
(issue 7's train-mode fast path on the CPU), and stay out of the way everywhere else."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from actrain import fused
from actrain.fused import bn_act, fused_bn_active, use_fused_bn
from actrain.models import create_model
from actrain.runtime import AttackView, cpu_runs_bf16

CL = torch.channels_last


def test_the_kernels_build_here():
    # CI runs on a machine like the development one (gcc, OpenMP): the fast path must exist.
    assert fused.available(), "fused_bn.c did not compile: is a C compiler with OpenMP there?"


def _bn(c: int, seed: int = 0) -> torch.nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    bn.running_mean.uniform_(-0.1, 0.1)
    return bn


def _run(bn, x, res, grad, relu, dtype=torch.bfloat16):
    """Output, input/residual/weight/bias gradients and buffers of one training-mode call."""
    x = x.to(dtype).detach().requires_grad_(True)
    res = None if res is None else res.to(dtype).detach().requires_grad_(True)
    y = bn_act(bn, x, res, relu)
    y.backward(grad.to(dtype))
    grads = [x.grad, None if res is None else res.grad, bn.weight.grad, bn.bias.grad]
    return y.float(), [None if g is None else g.float() for g in grads], bn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_batch_norm_add_relu_within_bf16_rounding(residual, relu):
    torch.manual_seed(1)
    # bf16 values, so that the fp32 reference sees exactly the same inputs
    x = (torch.randn(16, 32, 6, 6) * 2 + 0.7).contiguous(memory_format=CL).bfloat16().float()
    res = torch.randn_like(x).bfloat16().float() if residual else None
    grad = torch.randn_like(x).bfloat16().float()
    fast = _bn(32)
    use_fused_bn(fast)
    calls = []
    real = fused._BatchNormAct.apply
    fused._BatchNormAct.apply = lambda *a: calls.append(1) or real(*a)
    try:
        y_fast, g_fast, bn_fast = _run(fast, x, res, grad, relu)
    finally:
        fused._BatchNormAct.apply = real
    assert calls, "the fused kernels were not used"
    y_bf16, g_bf16, bn_bf16 = _run(_bn(32), x, res, grad, relu)  # the plain ops, in bf16
    y_ref, g_ref, bn_ref = _run(_bn(32), x, res, grad, relu, torch.float32)  # and in fp32

    # Each output is rounded to bf16 once, so the fused path is at least as close to fp32 as
    # the plain bf16 ops are, and close in absolute terms.
    assert _rel(y_fast, y_ref) < 4e-3
    assert _rel(y_fast, y_ref) <= _rel(y_bf16, y_ref) * 1.25
    for got, plain, want in zip(g_fast, g_bf16, g_ref, strict=True):
        if want is None:
            assert got is None
            continue
        assert _rel(got, want) < 1e-2
        assert _rel(got, want) <= max(_rel(plain, want) * 1.25, 4e-3)
    # Buffers: the batch mean and the unbiased batch variance enter the running averages.
    torch.testing.assert_close(bn_fast.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_fast.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn_fast.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 1


def test_a_portable_build_without_avx512_computes_the_same(monkeypatch):
    # Other CPUs get the vector code without AVX-512 intrinsics (the mask packing differs).
    portable = fused.load(("-O3", "-mno-avx512f", "-fopenmp", "-shared", "-fPIC"))
    assert portable is not None
    x = (torch.randn(16, 32, 6, 6) * 2 + 0.7).contiguous(memory_format=CL).bfloat16().float()
    res, grad = torch.randn_like(x), torch.randn_like(x)
    results = []
    for lib in (fused.library(), portable):
        monkeypatch.setattr(fused, "library", lambda lib=lib: lib)
        bn = _bn(32)
        use_fused_bn(bn)
        y, grads, _ = _run(bn, x, res, grad, relu=True)
        results.append([y, *grads, bn.running_var])
    for native, other in zip(*results, strict=True):
        torch.testing.assert_close(other, native, rtol=1e-2, atol=1e-2)
        assert _rel(other, native) < 1e-3


def test_statistics_survive_a_large_mean():
    # Sums of squares around a large mean cancel; the kernels shift by a sample first.
    x = (torch.randn(32, 16, 8, 8) * 0.5 + 300.0).contiguous(memory_format=CL)
    fast, ref = _bn(16), _bn(16)
    use_fused_bn(fast)
    bn_act(fast, x.to(torch.bfloat16))
    bn_act(ref, x.to(torch.bfloat16).float())
    torch.testing.assert_close(fast.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.running_mean, ref.running_mean, rtol=1e-6, atol=1e-4)


def test_a_nan_stays_a_nan():
    x = torch.randn(4, 16, 4, 4).contiguous(memory_format=CL).to(torch.bfloat16)
    x[0, 3, 1, 1] = float("nan")
    bn = _bn(16)
    use_fused_bn(bn)
    y = bn_act(bn, x)
    assert torch.isnan(y[:, 3]).all() and not torch.isnan(y[:, :3]).any()


@pytest.mark.parametrize(
    "case",
    ["eval mode", "fp32", "NCHW", "channels not a multiple of 16", "switched off", "residual fp32"],
)
def test_everywhere_else_it_is_the_plain_ops_bit_for_bit(case):
    c = 24 if case == "channels not a multiple of 16" else 32
    x = torch.randn(8, c, 5, 5).contiguous(memory_format=CL).to(torch.bfloat16)
    res = torch.randn_like(x)
    if case == "fp32":
        x, res = x.float(), res.float()
    if case == "NCHW":
        x, res = x.contiguous(), res.contiguous()
    if case == "residual fp32":
        res = res.float()
    a, b = _bn(c), _bn(c)
    use_fused_bn(a, on=case != "switched off")
    if case == "eval mode":
        a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(bn_act(a, x, res), F.relu(b(x) + res))
    assert torch.equal(a.running_var, b.running_var)


def _resnet_step(model, x, y, bf16: bool = True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return float(loss.detach()), grads


def test_resnet18_train_step_agrees_with_the_plain_bf16_step():
    torch.manual_seed(0)
    plain = create_model("resnet18", width=16, num_classes=10).to(memory_format=CL)
    fast, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    keys = list(fast.state_dict())
    assert use_fused_bn(fast) == 20  # stem, 16 in the blocks, 3 on projection shortcuts
    assert list(fast.state_dict()) == keys and fused_bn_active(fast)
    x = torch.rand(32, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (32,))
    loss_plain, g_plain = _resnet_step(plain, x, y)
    loss_fast, g_fast = _resnet_step(fast, x, y)
    loss_ref, g_ref = _resnet_step(ref, x, y, bf16=False)
    assert abs(loss_fast - loss_ref) < 0.02 and abs(loss_plain - loss_ref) < 0.02
    assert _rel(g_fast, g_ref) <= _rel(g_plain, g_ref) * 1.25
    for a, b in zip(fast.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.02)
    # Same thread count, same input: the same bits (static OpenMP schedule).
    again = copy.deepcopy(plain)
    use_fused_bn(again)
    _resnet_step(again, x, y)
    fast2 = copy.deepcopy(plain)
    use_fused_bn(fast2)
    assert torch.equal(_resnet_step(fast2, x, y)[1], _resnet_step(again, x, y)[1])


def test_attack_view_still_folds_every_conv_bn_pair():
    model = create_model("resnet18", width=16, num_classes=10)
    plain_pairs = AttackView(model).pairs
    use_fused_bn(model)
    assert AttackView(model, torch.bfloat16).pairs == plain_pairs
    assert len(plain_pairs) == 20


def test_preact_and_wide_resnets_take_it_too():
    torch.manual_seed(0)
    for name, kw in (("preact_resnet18", {"width": 16}), ("wideresnet", {"depth": 10})):
        plain = create_model(name, num_classes=10, **kw).to(memory_format=CL)
        fast, ref = copy.deepcopy(plain), copy.deepcopy(plain)
        use_fused_bn(fast)
        x = torch.rand(8, 3, 32, 32).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (8,))
        _, g_plain = _resnet_step(plain, x, y)
        _, g_fast = _resnet_step(fast, x, y)
        _, g_ref = _resnet_step(ref, x, y, bf16=False)
        assert _rel(g_fast, g_ref) <= _rel(g_plain, g_ref) * 1.25, name


def test_attack_blocks_add_and_relu_in_one_kernel():
    # With batch norm folded away (AttackView) a block is relu(conv(x) + shortcut).
    ident = torch.nn.Identity()
    ident.fused_kernels = True
    torch.manual_seed(3)
    x = torch.randn(8, 32, 6, 6).contiguous(memory_format=CL).bfloat16().float()
    res, grad = torch.randn_like(x).bfloat16().float(), torch.randn_like(x).bfloat16()
    a = x.bfloat16().requires_grad_(True)
    b = res.bfloat16().requires_grad_(True)
    calls = []
    real = fused._AddReLU.apply
    fused._AddReLU.apply = lambda *args: calls.append(1) or real(*args)
    try:
        y = bn_act(ident, a, b)
    finally:
        fused._AddReLU.apply = real
    assert calls
    exact = x + res  # fp32: one rounding to bf16 at the end, as the kernel does
    assert torch.equal(y, F.relu(exact).bfloat16())
    y.backward(grad)
    want = torch.where(exact > 0, grad, torch.zeros_like(grad))
    assert torch.equal(a.grad, want) and torch.equal(b.grad, want)
    # a NaN stays a NaN
    a2 = a.detach().clone()
    a2[0, 0, 0, 0] = float("nan")
    assert torch.isnan(bn_act(ident, a2, b.detach())[0, 0, 0, 0])


def test_pgd_on_the_folded_view_lands_as_near_the_fp32_attack_as_the_plain_ops():
    import contextlib

    from actrain.attacks import LinfBall, pgd
    from actrain.losses import madry_attack_objective

    torch.manual_seed(0)
    model = create_model("resnet18", width=16, num_classes=10).to(memory_format=CL)
    model.train()
    with torch.no_grad():  # BN statistics that are not the identity
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32).contiguous(memory_format=CL))
    fast = copy.deepcopy(model)
    use_fused_bn(fast)
    views = [AttackView(m, torch.bfloat16).module.eval() for m in (model, fast)]
    views.append(AttackView(model).module.eval())  # fp32, the reference
    assert any(getattr(m, "fused_kernels", False) for m in views[1].modules())
    x = torch.rand(32, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (32,))
    threat = LinfBall(8 / 255, 2 / 255)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    found = []
    for view, precision in zip(views, (bf16, bf16, contextlib.nullcontext), strict=True):
        torch.manual_seed(5)
        objective = lambda lg: madry_attack_objective(lg, y)  # noqa: E731
        found.append(pgd(view, x, objective, threat, 5, autocast=precision))
    # A sign flips where bf16 rounds a near-zero gradient; the fused ops round less often
    # (conv + add + ReLU once), so they must stay at least as close to fp32 as the plain ops.
    plain, fused_, exact = found
    agree_plain = ((plain - exact).abs() < 1e-6).float().mean()
    agree_fused = ((fused_ - exact).abs() < 1e-6).float().mean()
    assert agree_plain > 0.75 and agree_fused >= agree_plain - 0.01
    with torch.no_grad(), bf16():
        torch.testing.assert_close(views[1](x).float(), views[0](x).float(), rtol=0.05, atol=0.05)


def test_without_a_c_compiler_it_is_the_plain_ops(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached to fall back on
    assert fused.load() is None
    monkeypatch.setattr(fused, "library", lambda: None)
    assert not fused.available()
    x = torch.randn(8, 32, 5, 5).contiguous(memory_format=CL).to(torch.bfloat16)
    a, b = _bn(32), _bn(32)
    use_fused_bn(a)
    assert not fused_bn_active(a)
    with torch.no_grad():
        assert torch.equal(bn_act(a, x, x), F.relu(b(x) + x))


def _two_uses(kind: str, fork: bool, uses: str, seed: int = 5):
    """Gradients when a fused block output feeds two consumers (a block's conv and shortcut)."""
    torch.manual_seed(seed)
    x = (torch.randn(8, 32, 6, 6) + 0.3).contiguous(memory_format=CL).bfloat16()
    res = torch.randn_like(x).requires_grad_(True)
    x.requires_grad_(True)
    g1, g2 = torch.randn_like(x), torch.randn_like(x)
    layer = _bn(32) if kind == "train" else torch.nn.Identity()  # Identity: AttackView's
    layer.fused_kernels = True
    y = bn_act(layer, x, res, fork=fork)
    twin = fused.shortcut_input(y)
    assert (twin is not y) == fork
    loss = 0
    if "y" in uses:
        loss = loss + (y.float() * g1.float()).sum()
    if "twin" in uses:
        loss = loss + (twin.float() * g2.float()).sum()
    loss.backward()
    grads = [x.grad, res.grad]
    if kind == "train":
        grads += [layer.weight.grad, layer.bias.grad]
    return grads


@pytest.mark.parametrize("kind", ["train", "attack"])
@pytest.mark.parametrize("uses", ["y twin", "y", "twin"])
def test_a_forked_output_sums_its_two_gradients_in_the_kernel_bit_for_bit(kind, uses):
    # The twin shares y's memory; its gradient reaches the backward apart from y's and is
    # added there, rounded to bf16 once, exactly as autograd's own sum of the two would be.
    forked = _two_uses(kind, True, uses)
    summed = _two_uses(kind, False, uses)  # without fork the "twin" is y itself
    for a, b in zip(forked, summed, strict=True):
        assert torch.equal(a, b)


def _backward_sums(model, x, y, bf16: bool = True) -> tuple[list[torch.Tensor], int]:
    """Input and parameter gradients of one bf16 step, and how many activation-sized sums
    autograd ran in the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sums = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and (
                args[0].dim() == 4
            ):
                sums.append(func)
            return func(*args, **(kwargs or {}))

    model.zero_grad(set_to_none=True)  # no accumulation into earlier gradients
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(xx).float(), y)
    with Count():
        loss.backward()
    return [xx.grad, *(p.grad for p in model.parameters() if p.grad is not None)], len(sums)


def test_resnet18_blocks_sum_their_input_gradients_inside_the_kernels(monkeypatch):
    torch.manual_seed(0)
    model = create_model("resnet18", width=16, num_classes=10).to(memory_format=CL)
    use_fused_bn(model)
    x = torch.rand(16, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))
    view = AttackView(model, torch.bfloat16).module.eval()
    results = {}
    for fork in (True, False):
        if not fork:  # every block input used twice, summed by autograd as before
            monkeypatch.setattr(fused, "_forked", lambda out, fork, x=None: out)
        for name, m in (("train", copy.deepcopy(model)), ("attack", view)):
            results[fork, name] = _backward_sums(m, x, y)
    for name in ("train", "attack"):
        (g_fork, n_fork), (g_plain, n_plain) = results[True, name], results[False, name]
        assert n_plain == 8 and n_fork == 0, name  # 8 blocks, each input read twice
        for a, b in zip(g_fork, g_plain, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.skipif(not cpu_runs_bf16(), reason="oneDNN has no bf16 kernels on this CPU")
@pytest.mark.parametrize("residual", [False, True])
def test_attack_blocks_run_conv_add_and_relu_as_one_onednn_call(residual, monkeypatch):
    # AttackView's blocks: relu(conv(x) + folded bias + shortcut), constant bf16 weights.
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
    conv.weight.data = conv.weight.data.bfloat16().contiguous(memory_format=CL)
    conv.bias.data = conv.bias.data.bfloat16()
    conv.requires_grad_(False)
    ident = torch.nn.Identity()
    ident.fused_kernels = True
    x = torch.randn(8, 16, 9, 9).contiguous(memory_format=CL).bfloat16().float()
    res = torch.randn(8, 32, 5, 5).contiguous(memory_format=CL).bfloat16().float()
    grad = torch.randn_like(res)
    calls = []
    real = fused._ConvAddReLU.apply
    monkeypatch.setattr(fused._ConvAddReLU, "apply", lambda *a: calls.append(1) or real(*a))
    a = x.clone().requires_grad_(True)  # fp32 input, as the attack's x + delta is
    b = res.bfloat16().requires_grad_(True) if residual else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused.conv_bn_act(conv, ident, a, b, fork=True)
    assert calls and fused.shortcut_input(out) is not out
    twin = fused.shortcut_input(out)
    ((out.float() * grad).sum() + (twin.float() * grad).sum()).backward()
    # fp32 reference with the same (bf16-valued) weights
    a32 = x.clone().requires_grad_(True)
    r32 = res.clone().requires_grad_(True)
    pre = F.conv2d(a32, conv.weight.float(), conv.bias.float(), 2, 1) + (r32 if residual else 0)
    want = F.relu(pre)
    (want * 2 * grad).sum().backward()
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    assert _rel(out.float(), want) < 4e-3  # one bf16 rounding of the output
    assert _rel(a.grad, a32.grad) < 1e-2
    if residual:
        assert _rel(b.grad.float(), r32.grad) < 1e-2


def test_an_nchw_model_with_one_pixel_activations_keeps_the_plain_conv():
    # An 8x8 input leaves ResNet-18's last stage 1x1, which passes for channels_last whatever
    # the layout; with NCHW weights oneDNN's bf16 add + ReLU post-op raised an internal error
    # in the first attack pass of `--precision bf16 --no-channels-last --fused-bn` on digits.
    from actrain.runtime import attack_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1, width=16).eval()
    plain = attack_model(copy.deepcopy(model), True, "bf16")
    use_fused_bn(model)
    view = attack_model(model, True, "bf16")
    x = torch.rand(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = view(x), plain(x)
    assert torch.isfinite(out).all() and _rel(out.float(), want.float()) < 2e-2


def test_torch_compile_traces_the_fast_models_without_graph_breaks():
    # `actrain bench --compile`: the fused and im2col paths step aside under torch.compile
    # (a graph break per block made dynamo recompile each block class past its limit).
    from actrain.im2col import use_im2col_convs

    model = create_model("resnet18", width=16, num_classes=10).to(memory_format=CL)
    use_fused_bn(model)
    use_im2col_convs(model)  # at width 16 layer 4 takes the weight-gradient matmul
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=CL)
    view = AttackView(model, torch.bfloat16).module.eval()
    for m, inp in ((model, x), (view, x.clone().requires_grad_(True))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explained = torch._dynamo.explain(m)(inp)
        assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("relu", [True, False])
def test_an_unfoldable_eval_batch_norm_is_its_affine_map_in_one_kernel(relu):
    # AttackView: a batch norm after a residual add (pre-activation) has no conv to fold into.
    bn = _bn(32, seed=7)
    bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    frozen = fused.FrozenBatchNorm2d(32)
    frozen.refresh_from(bn)
    torch.manual_seed(8)
    x = torch.randn(8, 32, 6, 6).contiguous(memory_format=CL).bfloat16()
    g1, g2 = torch.randn_like(x), torch.randn_like(x)
    a = x.clone().requires_grad_(True)
    y = bn_act(frozen, a, relu=relu, fork=True)
    twin = fused.shortcut_input(y)
    assert twin is not y  # the fused kernel ran (the plain path has no twin)
    ((y.float() * g1.float()).sum() + (twin.float() * g2.float()).sum()).backward()
    # fp32 reference: eval batch norm (+ ReLU) on the same bf16 input
    r = x.float().requires_grad_(True)
    with torch.no_grad():
        ref_bn = copy.deepcopy(bn).float()
    want = ref_bn(r)
    want = F.relu(want) if relu else want
    (want * (g1.float() + g2.float())).sum().backward()
    assert _rel(y.float(), want) < 4e-3
    assert _rel(a.grad.float(), r.grad) < 1e-2
    # and the plain forward of the module is the same map
    assert _rel(frozen(x.float()), ref_bn(x.float())) < 1e-6


def test_pre_activation_attack_views_take_the_fused_kernels():
    torch.manual_seed(0)
    for name, kw in (("preact_resnet18", {"width": 16}), ("wideresnet", {"depth": 10})):
        model = create_model(name, num_classes=10, **kw).to(memory_format=CL)
        model.train()
        with torch.no_grad():  # batch statistics that are not the identity
            for _ in range(3):
                model(torch.rand(16, 3, 32, 32).contiguous(memory_format=CL))
        plain_view = AttackView(model, torch.bfloat16).module.eval()
        use_fused_bn(model)
        view = AttackView(model, torch.bfloat16)
        assert view._frozen, name  # the blocks' first batch norms, which follow an add
        frozen = [m for m in view.module.modules() if isinstance(m, fused.FrozenBatchNorm2d)]
        assert len(frozen) == len(view._frozen)
        fp32 = AttackView(model).module.eval()  # reference: fp32, plain ops
        x = torch.rand(16, 3, 32, 32).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (16,))
        grads = []
        for m, bf16 in ((view.module.eval(), True), (plain_view, True), (fp32, False)):
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(m(xx).float(), y)
            grads.append(torch.autograd.grad(loss, xx)[0])
        fast, plain, exact = grads
        assert _rel(fast, exact) <= _rel(plain, exact) * 1.25 + 1e-3, name


@pytest.mark.parametrize("name", ["preact_resnet18", "wideresnet"])
def test_pre_activation_blocks_sum_their_input_gradients_inside_the_kernels(name, monkeypatch):
    # x feeds bn1 and the identity shortcut (or bn1's output feeds conv1 and the projection):
    # the kernels add the second gradient in their own pass, rounding once instead of twice.
    torch.manual_seed(0)
    kw = {"width": 16} if name == "preact_resnet18" else {"depth": 16, "widen_factor": 2}
    model = create_model(name, num_classes=10, **kw).to(memory_format=CL)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32).contiguous(memory_format=CL))
    use_fused_bn(model)
    x = torch.rand(16, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))
    fp32 = copy.deepcopy(model)
    use_fused_bn(fp32, False)
    exact_train = _backward_sums(fp32.float(), x, y, bf16=False)[0]
    exact_attack = _backward_sums(AttackView(fp32).module.eval(), x, y, bf16=False)[0]
    view = AttackView(model, torch.bfloat16).module.eval()
    results = {}
    for twins in (True, False):
        if not twins:
            monkeypatch.setattr(fused, "_forked", lambda out, fork, x=None: out)
        results[twins, "train"] = _backward_sums(copy.deepcopy(model), x, y)
        results[twins, "attack"] = _backward_sums(view, x, y)
    blocks = sum(1 for m in model.modules() if type(m).__name__ in ("PreActBlock", "WideBlock"))
    for kind, exact in (("train", exact_train), ("attack", exact_attack)):
        (g_twin, n_twin), (g_sum, n_sum) = results[True, kind], results[False, kind]
        assert n_sum == blocks and n_twin == 0, kind
        if kind == "attack":  # input gradients: what an attack reads
            g_twin, g_sum, exact = g_twin[:1], g_sum[:1], exact[:1]
        flat = [torch.cat([t.float().flatten() for t in g]) for g in (g_twin, g_sum, exact)]
        assert _rel(flat[0], flat[2]) <= _rel(flat[1], flat[2]) * 1.1 + 1e-3, kind


def test_a_run_says_the_kernels_ran_only_where_its_model_calls_them():
    # torchvision's ResNet-50 calls its batch norms itself: switching them on changes nothing,
    # and final.json / bench rows said "fused" for it
    from actrain.fused import fused_bn_ran

    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=CL)
    for name, kw, ran in (("resnet18", {"width": 16}, True), ("resnet50", {}, False)):
        model = create_model(name, num_classes=10, **kw).to(memory_format=CL).train()
        use_fused_bn(model)
        assert fused_bn_active(model) and not fused_bn_ran(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        assert fused_bn_ran(model) is ran, name


def test_attack_blocks_keep_the_plain_conv_where_onednn_has_no_bf16(monkeypatch):
    # AVX2-only CPUs: oneDNN's fused conv raises in bf16, PyTorch's own conv runs (slowly).
    import actrain.runtime

    monkeypatch.setattr(actrain.runtime, "cpu_runs_bf16", lambda: False)
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    conv.weight.data = conv.weight.data.bfloat16().contiguous(memory_format=CL)
    conv.bias.data = conv.bias.data.bfloat16()
    conv.requires_grad_(False)
    ident = torch.nn.Identity()
    ident.fused_kernels = True
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=CL)
    calls = []
    real = fused._ConvAddReLU.apply
    monkeypatch.setattr(fused._ConvAddReLU, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused.conv_bn_act(conv, ident, x)
        ref = F.relu(conv(x))
    assert not calls
    assert torch.equal(out, ref)
