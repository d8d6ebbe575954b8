"""The im2col + matmul convolution computes what oneDNN's does (issue 7's full-width path)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from actrain import im2col
from actrain.im2col import Im2colConv2d, im2col_conv3x3, im2col_pays, use_im2col_convs
from actrain.models import create_model
from actrain.runtime import AttackView, cpu_has_amx


def _same_values_and_gradients(ours, ref, inputs) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(ref)
    got = torch.autograd.grad(ours, inputs, go)
    want = torch.autograd.grad(ref, inputs, go)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


def test_matches_conv2d_and_its_gradients_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 5, 3, 3), torch.randn(4)
    for t in (x, w, b):
        t.requires_grad_(True)
    _same_values_and_gradients(im2col_conv3x3(x, w, b), F.conv2d(x, w, b, padding=1), (x, w, b))
    args = [
        torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True),
        torch.randn(5, 3, 3, 3, dtype=torch.double, requires_grad=True),
        torch.randn(5, dtype=torch.double, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(im2col_conv3x3, args)
    for size in (7, 8):  # stride 2, odd and even inputs
        x2 = torch.randn(2, 3, size, size, dtype=torch.double, requires_grad=True)
        w2, b2 = args[1], args[2]
        torch.testing.assert_close(
            im2col_conv3x3(x2, w2, b2, stride=2), F.conv2d(x2, w2, b2, stride=2, padding=1)
        )
        assert torch.autograd.gradcheck(lambda *a: im2col_conv3x3(*a, stride=2), (x2, w2, b2))


def test_its_output_may_be_modified_in_place_as_torchvisions_bottleneck_does():
    # ReLU(inplace=True) on the output (ResNet-50's blocks): it was a view made inside the
    # autograd function, which autograd refuses to let anyone modify
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    out = im2col_conv3x3(x, w, b)
    assert out.is_contiguous(memory_format=torch.channels_last) and out._base is None
    y = F.relu(out, inplace=True)
    _same_values_and_gradients(y, F.relu(F.conv2d(x, w, b, padding=1)), (x, w, b))


def test_full_width_resnet18_uses_it_only_in_its_last_stage_and_agrees_in_bf16(monkeypatch):
    assert im2col_pays(512, 4, 4) and not im2col_pays(128, 4, 4) and not im2col_pays(512, 8, 8)
    assert im2col_pays(256, 4, 4, stride=2) and not im2col_pays(64, 4, 4, stride=2)
    torch.manual_seed(0)
    plain = create_model("resnet18", width=64, num_classes=10)
    plain = plain.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    # the stem, the 13 stride-1 and the 3 stride-2 3x3 convs of the blocks, 3 projections
    assert use_im2col_convs(fast) == 20
    assert sum(isinstance(m, Im2colConv2d) for m in fast.modules()) == 20
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())

    calls = []

    def spy(x, w, b=None, stride=1):
        calls.append((*x.shape[1:], stride))
        return im2col_conv3x3(x, w, b, stride)

    monkeypatch.setattr(im2col, "im2col_conv3x3", spy)
    x = torch.rand(4, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # outside autocast (fp32) it is the plain conv, bit for bit
        assert torch.equal(fast.eval()(x), plain.eval()(x))
    plain.train(), fast.train()
    grads, logits = [], []
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        logits.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # layer4's stride-2 256 -> 512 conv and its three 512 -> 512 convs, nothing else
    assert calls == [(256, 8, 8, 2)] + [(512, 4, 4, 1)] * 3
    torch.testing.assert_close(logits[1], logits[0], rtol=0.05, atol=0.02)
    cos = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99  # same gradient up to bf16 rounding of the summation order


def test_batch_norm_folding_still_sees_the_subclassed_convs():
    model = create_model("resnet18", width=4, num_classes=10)
    use_im2col_convs(model)
    assert len(AttackView(model).pairs) == 20


def test_the_trainer_takes_the_path_at_full_width_in_bf16_and_the_benchmark_says_so():
    from actrain import bench

    base = {"method": "madry", "arch": "resnet18", "batch_size": 2, "steps": 1, "device": "cpu"}
    fast = {"iters": 1, "warmup": 0, "reference": False, "threads": 1, "flops": False}

    def run(width: int, precision: str) -> dict:
        return bench.run_bench(bench.BenchSpec(width=width, precision=precision, **base, **fast))

    full = run(64, "bf16")  # the shape rule was measured on AMX CPUs, and is used on those only
    assert full["im2col"] == cpu_has_amx() == ("im2col" in bench.format_line(full))
    assert not run(64, "fp32")["im2col"]
    quarter = run(16, "bf16")  # layer 4 (128 channels, 4x4) takes only its weight gradient
    assert not quarter["im2col"]
    assert quarter["mm_wgrad"] == cpu_has_amx() == ("mmWgrad" in bench.format_line(quarter))
    assert not full["mm_wgrad"] or cpu_has_amx()


def _bf16_pass(conv: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> list:
    """``conv`` forward under bf16 autocast and backward from ``g``: [output, input gradient,
    weight gradient, bias gradient]."""
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(xx)
    out.float().backward(g)
    bias_grad = conv.bias.grad if conv.bias is not None else None
    return [out.float(), xx.grad, conv.weight.grad, bias_grad]


@pytest.mark.parametrize(
    ("c_in", "c_out", "size", "kernel", "stride"),
    [(64, 32, 4, 3, 1), (64, 48, 8, 3, 2), (32, 64, 8, 1, 2)],
)
def test_weight_gradient_as_a_matmul_matches_onednn(c_in, c_out, size, kernel, stride):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=True)
    fast = copy.deepcopy(conv)
    assert use_im2col_convs(fast) == 1
    out_size = (size - 1) // stride + 1
    assert im2col.weight_grad_by_matmul(kernel, c_in, out_size, out_size, stride)
    x = torch.randn(6, c_in, size, size).to(memory_format=torch.channels_last)
    g = torch.randn(6, c_out, out_size, out_size)
    results = [_bf16_pass(m, x, g) for m in (conv, fast)]
    assert getattr(fast, "matmul_weight_grad_used", False)
    assert fast.weight.grad.dtype == torch.float32 and fast.weight.grad.shape == conv.weight.shape
    assert torch.equal(results[0][0], results[1][0])  # the forward is oneDNN's, bit for bit
    assert torch.equal(results[0][1], results[1][1])  # and so is the input gradient
    for a, b in zip(results[0][2:], results[1][2:], strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-2  # bf16 rounding of the sums only
    # fp32 or no autocast: the plain conv, bit for bit
    with torch.no_grad():
        assert torch.equal(fast(x), conv(x))
    # weight_grads=False (the Trainer's --no-fused-bn): oneDNN's weight gradient, bit for bit
    off = copy.deepcopy(conv)
    use_im2col_convs(off, weight_grads=False)
    assert torch.equal(_bf16_pass(off, x, g)[2], results[0][2])
    assert not getattr(off, "matmul_weight_grad_used", False)


@pytest.mark.parametrize(("c_in", "c_out", "size"), [(16, 32, 8), (32, 64, 8), (8, 16, 7)])
@pytest.mark.parametrize("frozen", [False, True])
def test_a_strided_1x1_input_gradient_is_onednns_in_train_and_attack_passes(
    c_in, c_out, size, frozen, monkeypatch
):
    """A projection shortcut's input gradient as one matmul into every other position: the
    values oneDNN's backward gives, in a train pass and in an attack pass (``frozen``: the
    folded weights of actrain.runtime.AttackView, which need no gradient); the weight gradient
    stays oneDNN's where the matmul rule says so (16 input channels)."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(c_in, c_out, 1, stride=2, bias=frozen)
    conv.requires_grad_(not frozen)
    fast = copy.deepcopy(conv)
    assert use_im2col_convs(fast) == 1
    calls = []
    real = im2col.strided_pointwise_input_grad
    monkeypatch.setattr(
        im2col, "strided_pointwise_input_grad", lambda *a: calls.append(1) or real(*a)
    )
    x = torch.randn(5, c_in, size, size).to(memory_format=torch.channels_last)
    out_size = (size - 1) // 2 + 1
    g = torch.randn(5, c_out, out_size, out_size)
    (out_a, gx_a, gw_a, _), (out_b, gx_b, gw_b, _) = (_bf16_pass(m, x, g) for m in (conv, fast))
    assert calls == [1]
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert gx_b.shape == x.shape and gx_b[:, :, 1::2].abs().sum() == 0
    if frozen:
        assert gw_a is None and gw_b is None
    else:
        assert getattr(fast, "matmul_weight_grad_used", False) == (c_in >= 32)
        if c_in < 32:
            assert torch.equal(gw_a, gw_b)


def test_the_weight_gradient_rule(monkeypatch):
    wg = im2col.weight_grad_by_matmul
    # 3x3 convs with multiples of 16 channels: the AMX kernel, where the CPU has AMX
    assert wg(3, 64, 8, 8) == wg(3, 32, 16, 16, out_channels=32) == cpu_has_amx()
    assert wg(3, 16, 16, 16, stride=2, out_channels=32) == cpu_has_amx()
    assert not wg(3, 24, 8, 8) and not wg(3, 64, 8, 8, out_channels=40)  # oneDNN's
    monkeypatch.setattr("actrain.runtime.cpu_has_amx", lambda: False)
    assert wg(3, 128, 4, 4) and wg(3, 64, 4, 4, stride=2) and not wg(3, 64, 8, 8)
    assert not wg(3, 32, 4, 4) and wg(1, 32, 8, 8, stride=2) and not wg(1, 16, 16, 16, stride=2)


def test_an_input_gradient_alone_skips_the_weight_gradient(monkeypatch):
    # An attack's autograd.grad w.r.t. the image (pre-activation models keep some convs
    # unfolded, whose weights require grad): PyTorch's conv skips the weight gradient there,
    # and so must the matmul and AMX paths, which ask the autograd engine.
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(64, 32, 3, padding=1, bias=False)
    use_im2col_convs(conv)
    calls = []
    real_cols, real_amx = im2col._cols, im2col.amx_weight_grad
    monkeypatch.setattr(im2col, "_cols", lambda *a, **k: calls.append(1) or real_cols(*a, **k))
    monkeypatch.setattr(im2col, "amx_weight_grad", lambda *a: calls.append(2) or real_amx(*a))
    x = torch.randn(4, 64, 4, 4).to(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert conv.matmul_weight_grad_used
    (grad_x,) = torch.autograd.grad(out.float().sum(), x)
    assert grad_x.shape == x.shape and not calls and conv.weight.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()  # a training backward: the weight gradient is computed
    assert calls and conv.weight.grad is not None


@pytest.mark.skipif(not cpu_has_amx(), reason="the AMX weight-gradient kernel needs AMX")
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_weight_gradient_matches_fp32_better_than_onednn(threads):
    """16 -> 16 channels, 3x3, 32 wide (ResNet-18's first stage at width 16): the weight
    gradient from fused_bn.c's AMX kernel, summed in fp32, against an fp32 reference; oneDNN's
    bf16 result is rounded to bf16 along the way, so it is the looser of the two."""
    from actrain import fused

    torch.manual_seed(2)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    fast = copy.deepcopy(conv)
    use_im2col_convs(fast)
    assert im2col.weight_grad_by_matmul(3, 16, 32, 32, 1, out_channels=16)
    x = torch.randn(10, 16, 20, 32).bfloat16().float().contiguous(memory_format=torch.channels_last)
    g = torch.randn(10, 16, 20, 32).bfloat16().float()
    w = conv.weight.detach().bfloat16().float()
    want = torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    gb = g.bfloat16().contiguous(memory_format=torch.channels_last)
    assert fused.amx_weight_grad_fits(xb, gb, conv.weight.bfloat16())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads = []
        for m in (conv, fast):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            out.float().backward(g)
            grads.append(m.weight.grad)
        kernel = fused.amx_weight_grad(xb, gb)
    finally:
        torch.set_num_threads(previous)
    assert getattr(fast, "matmul_weight_grad_used", False)
    err_onednn, err_amx = (float((w - want).norm() / want.norm()) for w in grads)
    assert err_amx < 5e-3 and err_amx <= err_onednn
    # the kernel's fp32 sums, nearly exact, reach the parameter as they are: not rounded to
    # bf16 and cast back on the way, and in the parameter's own layout
    torch.testing.assert_close(kernel, want, rtol=1e-4, atol=1e-3)
    assert torch.equal(grads[1], kernel) and grads[1].stride() == fast.weight.stride()
    assert not torch.equal(grads[1], grads[1].bfloat16().float())


@pytest.mark.skipif(not cpu_has_amx(), reason="the AMX weight-gradient kernel needs AMX")
def test_a_channels_last_models_weight_gradients_arrive_in_fp32_and_its_layout():
    """In a channels_last model (as the Trainer builds them) every conv's weight gradient is
    fp32 in the parameter's layout, whichever path computed it (AMX kernel, matmul, oneDNN,
    im2col), and the AMX kernel's are its fp32 sums, not bf16 values."""
    torch.manual_seed(5)
    model = create_model("resnet18", num_classes=10, width=64).to(memory_format=torch.channels_last)
    use_im2col_convs(model)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(getattr(m, "im2col_used", False) for m in convs)
    for m in convs:
        grad = m.weight.grad
        assert grad.dtype == torch.float32 and grad.stride() == m.weight.stride()
    amx = [m for m in convs if m.kernel_size == (3, 3) and m.in_channels == 64]
    assert amx
    for m in amx:
        assert not torch.equal(m.weight.grad, m.weight.grad.bfloat16().float())


def _weight_grads(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, stride: int):
    """The fp32 weight gradient of bf16 x and g (the reference) and oneDNN's bf16 one."""
    args = (None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
    want = torch.ops.aten.convolution_backward(g.float(), x.float(), w.float(), *args)[1]
    onednn = torch.ops.aten.convolution_backward(g, x, w, *args)[1].float()
    return want, onednn


@pytest.mark.skipif(not cpu_has_amx(), reason="the AMX weight-gradient kernel needs AMX")
@pytest.mark.parametrize(
    ("n", "c_in", "c_out", "size", "stride", "threads"),
    [
        (3, 32, 32, 16, 1, 1),  # an odd batch; 16 wide: two image rows per 32-pixel block
        (4, 64, 48, 8, 1, 2),  # three output channel blocks: a lone last tile pair
        (6, 48, 16, 4, 1, 2),  # 4x4 images: a 32-pixel block spans two images
        (5, 16, 32, 32, 2, 1),  # stride 2: four parity planes
        (4, 32, 64, 16, 2, 2),
        (2, 64, 128, 8, 2, 1),  # into 4x4 outputs
        (2, 16, 16, 64, 1, 1),  # wider than 32: a row in two blocks
        (3, 16, 32, 12, 1, 1),  # not square: 12 rows of 32 ... 4 wide below
    ],
)
def test_the_general_amx_weight_gradient_matches_fp32(n, c_in, c_out, size, stride, threads):
    """fused_bn.c's AMX weight gradient for any 3x3 conv it fits (stride 1 or 2, multiples of
    16 channels, widths that divide 32 or that 32 divides): fp32 sums of the bf16 products,
    so it is closer to an fp32 reference than oneDNN's bf16 result, and nearly exact."""
    from actrain import fused

    torch.manual_seed(n * 100 + c_in + size)
    h, w = (size, 32) if size == 12 else (size, size)
    cl = torch.channels_last
    x = torch.randn(n, c_in, h, w).bfloat16().contiguous(memory_format=cl)
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    g = torch.randn(n, c_out, out_h, out_w).bfloat16().contiguous(memory_format=cl)
    weight = torch.randn(c_out, c_in, 3, 3).bfloat16()
    assert fused.amx_weight_grad_fits(x, g, weight, stride)
    want, onednn = _weight_grads(x, g, weight, stride)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fused.amx_weight_grad(x, g, stride)
    finally:
        torch.set_num_threads(previous)
    assert got is not None and got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert float((got - want).norm()) <= float((onednn - want).norm())


@pytest.mark.skipif(not cpu_has_amx(), reason="the AMX weight-gradient kernel needs AMX")
def test_the_amx_kernel_keeps_its_padding_zero_across_shapes_and_calls():
    """The kernel keeps each shape's rewrite buffers and writes only where pixels land: shapes
    called in turn (more of them than it keeps), with new data each time, must each still
    give the right gradient, as garbage left in a buffer's padding would not."""
    from actrain import fused

    cl = torch.channels_last
    shapes = [(4, 32, 32, s, 1) for s in (4, 8, 16, 32)] + [
        (n, 16, 32, s, 2) for n, s in ((2, 8), (4, 16), (6, 32))
    ] + [(3, 16, 16, 16, 1), (5, 32, 16, 8, 1), (7, 48, 32, 32, 1)]  # fmt: skip
    torch.manual_seed(3)
    for _ in range(2):
        for n, c_in, c_out, size, stride in shapes:
            x = (torch.randn(n, c_in, size, size) + 3).bfloat16().contiguous(memory_format=cl)
            out = (size - 1) // stride + 1
            g = (torch.randn(n, c_out, out, out) - 2).bfloat16().contiguous(memory_format=cl)
            want, _ = _weight_grads(x, g, torch.zeros(c_out, c_in, 3, 3).bfloat16(), stride)
            got = fused.amx_weight_grad(x, g, stride)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)


@pytest.mark.skipif(not cpu_has_amx(), reason="the AMX weight-gradient kernel needs AMX")
def test_convs_the_amx_kernel_does_not_fit_take_onednns_weight_gradient(monkeypatch):
    """A 3x3 conv routed to its own weight gradient (multiples of 16 channels) whose shape the
    kernel cannot take (an odd batch of 4x4 images; 6 wide) gets oneDNN's weight gradient, not
    the matmul over the patches, which is slow at these sizes."""
    from actrain import fused

    calls = []
    real = fused.amx_weight_grad
    monkeypatch.setattr(im2col, "amx_weight_grad", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(im2col, "_cols", lambda *a, **k: pytest.fail("the matmul path ran"))
    torch.manual_seed(4)
    for n, size in ((3, 4), (2, 6), (2, 8)):
        conv = torch.nn.Conv2d(32, 16, 3, padding=1, bias=False)
        fast = copy.deepcopy(conv)
        use_im2col_convs(fast)
        x = torch.randn(n, 32, size, size).to(memory_format=torch.channels_last)
        grads = []
        for m in (conv, fast):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            out.float().sum().backward()
            grads.append(m.weight.grad)
        assert fast.matmul_weight_grad_used
        fits = size == 8
        assert len(calls) == fits
        if fits:
            assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-2
        else:
            assert torch.equal(grads[0], grads[1])  # oneDNN's weight gradient, bit for bit
        calls.clear()
