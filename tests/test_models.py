"""Tests for the model registry and architectures (CPU, small inputs, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from actrain.models import UnknownModelError, create_model, list_models, register_model

# (name, kwargs, input shape [C, H, W], expected feature dim). Small widths keep this fast.
CASES = [
    ("resnet18", {"width": 8}, (3, 32, 32), 64),
    ("preact_resnet18", {"width": 8}, (3, 32, 32), 64),
    ("wideresnet", {"depth": 10, "widen_factor": 1}, (3, 32, 32), 64),
    ("small_cnn", {"width": 8}, (1, 8, 8), 32),
    ("resnet50", {}, (3, 64, 64), 2048),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(*args, **kwargs) -> nn.Module:
    """Build on the meta device: parameter counts of big models without allocating/initialising."""
    with torch.device("meta"):
        return create_model(*args, **kwargs)


def test_registry_lists_all_architectures() -> None:
    names = set(list_models())
    assert {
        "resnet18",
        "preact_resnet18",
        "wideresnet",
        "wrn-28-10",
        "wrn-34-10",
        "resnet50",
        "small_cnn",
    } <= names
    assert list_models() == sorted(names)


@pytest.mark.parametrize(("name", "kwargs", "shape", "dim"), CASES)
def test_output_and_feature_shapes(name: str, kwargs: dict, shape: tuple, dim: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=shape[0], **kwargs).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, dim)
    assert model.num_features == dim
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == dim
    assert torch.isfinite(logits).all()
    # forward is exactly the classifier applied to the penultimate features.
    torch.testing.assert_close(logits, model.classifier(feats))


@pytest.mark.parametrize(("name", "kwargs", "shape", "dim"), CASES)
def test_spec_roundtrip(name: str, kwargs: dict, shape: tuple, dim: int) -> None:
    model = create_model(name, num_classes=5, in_channels=shape[0], **kwargs)
    assert model.spec == {"arch": name, "num_classes": 5, "in_channels": shape[0], **kwargs}
    spec = json.loads(json.dumps(model.spec))  # survives a checkpoint round trip
    rebuilt = create_model(**spec)
    also = create_model(spec["arch"], **{k: v for k, v in spec.items() if k != "arch"})
    ref = {k: v.shape for k, v in model.state_dict().items()}
    for other in (rebuilt, also):
        assert type(other) is type(model)
        assert other.spec == model.spec
        assert {k: v.shape for k, v in other.state_dict().items()} == ref


def test_alias_spec_keeps_alias_name() -> None:
    model = meta_model("wrn-34-10", num_classes=100)
    assert model.spec == {"arch": "wrn-34-10", "num_classes": 100, "in_channels": 3}
    rebuilt = meta_model(**model.spec)
    assert rebuilt.spec["arch"] == "wrn-34-10"
    assert n_params(rebuilt) == n_params(model)


def test_seeded_construction_is_deterministic() -> None:
    def build() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        return create_model("resnet18", width=8).state_dict()

    a, b = build(), build()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resnet18_width_scaling() -> None:
    full = n_params(meta_model("resnet18"))
    quarter = n_params(meta_model("resnet18", width=16))
    # The CIFAR ResNet-18 has ~11.17M parameters (10 classes).
    assert 11_100_000 < full < 11_250_000
    # Convs scale with width**2; only BN and the linear head scale linearly.
    assert 14.5 < full / quarter < 16.5


def test_preact_resnet18_param_count() -> None:
    assert 11_100_000 < n_params(meta_model("preact_resnet18")) < 11_250_000


def test_wideresnet_param_counts() -> None:
    wrn28 = n_params(meta_model("wrn-28-10"))
    assert 36_000_000 < wrn28 < 37_000_000
    assert n_params(meta_model("wideresnet", depth=28, widen_factor=10)) == wrn28
    assert 45_500_000 < n_params(meta_model("wrn-34-10")) < 46_500_000


def test_wideresnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wideresnet", depth=27)


def test_wideresnet_dropout_is_active_only_in_train() -> None:
    torch.manual_seed(0)
    model = create_model("wideresnet", depth=10, widen_factor=1, dropout=0.5)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_resnet50_normalises_inside() -> None:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=10).eval()
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))

    raw = resnet50(weights=None, num_classes=10).eval()
    state = {f"fc.{k}": v for k, v in model.classifier.state_dict().items()}
    state.update(model.net.state_dict())
    raw.load_state_dict(state)

    grey = torch.full((1, 3, 64, 64), 0.5)
    normalised = (grey - model.mean) / model.std
    with torch.no_grad():
        ours = model(grey)
        theirs = raw(normalised)
        unnormalised = raw(grey)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, unnormalised)
    # No duplicate head: the linear layer appears only under ``classifier``.
    assert not any(k.startswith("net.fc") for k in model.state_dict())


def test_resnet50_requires_rgb() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        create_model("resnet50", in_channels=1)


@pytest.mark.parametrize(("name", "kwargs", "shape", "dim"), CASES[:4])
def test_channels_last_and_bf16_autocast(name: str, kwargs: dict, shape: tuple, dim: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=shape[0], **kwargs).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    assert out_bf16.shape == ref.shape
    assert torch.isfinite(out_bf16).all()


def test_backward_under_autocast() -> None:
    """Attacks need input gradients; make sure they flow under bf16 autocast."""
    model = create_model("small_cnn", in_channels=1, width=8).train()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()


def test_small_cnn_on_digits_and_mnist_sizes() -> None:
    model = create_model("small_cnn", in_channels=1).eval()
    assert model.num_features == 128
    with torch.no_grad():
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownModelError, match="did you mean 'resnet18'") as info:
        create_model("resnt18")
    assert "unknown architecture 'resnt18'" in str(info.value)
    assert "choices:" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownModelError) as info:
        create_model("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_create_model_name_and_arch_handling() -> None:
    assert create_model(arch="small_cnn", width=4).spec["arch"] == "small_cnn"
    with pytest.raises(ValueError, match="conflicting"):
        create_model("small_cnn", arch="resnet18")
    with pytest.raises(TypeError):
        create_model()
    with pytest.raises(TypeError):
        create_model("small_cnn", no_such_kwarg=1)
    with pytest.raises(TypeError, match="JSON"):
        create_model("small_cnn", width=object())


def test_an_option_the_architecture_does_not_take_names_the_ones_it_does() -> None:
    with pytest.raises(TypeError, match="unknown option depth; resnet18 takes width$"):
        create_model("resnet18", depth=3)
    with pytest.raises(TypeError, match="unknown option foo; wideresnet takes depth, widen_fac"):
        create_model("wideresnet", foo=1)
    with pytest.raises(TypeError, match="resnet50 takes no options"):
        create_model("resnet50", width=8)


def test_register_model_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda **kw: nn.Linear(1, 1))


def test_static_architecture_names_match_registry():
    from actrain.models import ARCHITECTURES

    assert sorted(ARCHITECTURES) == sorted(list_models())


@pytest.mark.parametrize("fused", [False, True])
def test_basic_block_with_projection_is_the_standard_one(fused: bool) -> None:
    """relu(bn2(conv2(relu(bn1(conv1 x)))) + bn_s(conv_s x)) in train mode, written out here,
    with the projection's batch norm through the fused kernel or not (no ReLU on the shortcut)."""
    import torch.nn.functional as F

    from actrain.fused import available, use_fused_bn

    if fused and not available():
        pytest.skip("no C compiler for actrain.fused")
    torch.manual_seed(0)
    block = create_model("resnet18", num_classes=10, width=16).layers[1][0].train()
    proj_conv, proj_bn = block.shortcut
    for bn in (block.bn1, block.bn2, proj_bn):  # non-trivial affine terms
        nn.init.normal_(bn.weight, 1.0, 0.3)
        nn.init.normal_(bn.bias, 0.0, 0.3)
    x = torch.randn(8, 16, 8, 8)

    def bn(layer: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)

    out = F.relu(bn(block.bn1, block.conv1(x)))
    ref = F.relu(bn(block.bn2, block.conv2(out)) + bn(proj_bn, proj_conv(x)))
    if not fused:
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
        return
    use_fused_bn(block)
    block = block.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block(x.to(memory_format=torch.channels_last)).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
