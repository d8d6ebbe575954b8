"""actrain as a library: the public functions refuse inputs that gave raw errors or quietly
wrong numbers, and leave the caller's objects (model mode, RNG) as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from actrain.attacks import LinfBall
from actrain.attacks.autoattack import autoattack
from actrain.checkpoint import CheckpointError, load_model, save_weights
from actrain.config import build_config
from actrain.evaluation import robust_accuracy
from actrain.losses import act_losses, kl_divergence, trades_loss
from actrain.models import create_model, register_model
from actrain.runtime import gradient_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(512, 10),
    ).eval()  # fmt: skip


def test_the_folded_gradient_copy_follows_a_replaced_module_or_parameter():
    m, x = _net(), torch.rand(4, 1, 8, 8)
    robust_accuracy(m, x, torch.arange(4), eps=0.1, steps=1, restarts=1)  # builds the copy
    m[4] = nn.Linear(512, 10)  # a new head: the cached copy kept the old one
    assert (gradient_model(m)(x) - m(x)).abs().max() < 1e-5
    m[4].weight = nn.Parameter(torch.randn_like(m[4].weight))
    assert (gradient_model(m)(x) - m(x)).abs().max() < 1e-5


def test_evaluation_inputs_are_checked_by_name():
    m, x, y = _net(), torch.rand(6, 1, 8, 8), torch.arange(6)
    for kw, err, text in (
        ({"x": (x * 255).to(torch.uint8)}, TypeError, "x: expected float32 images"),
        ({"x": x * 255}, ValueError, r"x: images must lie in \[0, 1\]"),
        ({"y": y.int()}, TypeError, "y: expected int64 class labels"),
        ({"y": y[:, None]}, TypeError, "y: expected int64 class labels"),
        ({"batch_size": 0}, ValueError, "batch_size: must be a positive integer"),
        ({"eps": "8/255"}, ValueError, "eps: must be a number"),
        ({"steps": -1}, ValueError, "steps: must be an integer >= 0"),
        ({"restarts": 0}, ValueError, "restarts: must be an integer >= 1"),
        ({"targeted": -1}, ValueError, "targeted: must be an integer >= 0"),
    ):
        args = {"x": x, "y": y, "eps": 0.1, "steps": 1, "restarts": 1, **kw}
        with pytest.raises(err, match=text):
            robust_accuracy(m, args.pop("x"), args.pop("y"), **args)


def test_autoattack_leaves_the_global_random_state_alone():
    m, x = _net(), torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        y = m(x).argmax(1)  # every example attacked
    state = torch.get_rng_state()
    autoattack(m, x, y, 0.1, attacks=("apgd-ce",))  # the reference code calls manual_seed
    assert torch.equal(state, torch.get_rng_state())


def test_threat_model_and_losses_refuse_non_finite_values_and_take_numpy_scalars():
    assert LinfBall(np.float32(0.1), torch.tensor(0.01)).eps == pytest.approx(0.1)
    with pytest.raises(ValueError, match="must be finite"):
        LinfBall(0.1, float("nan"))
    logits, y = torch.randn(4, 10), torch.arange(4)
    with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
        act_losses(logits, logits, y, 0.5, temperature=float("inf"))
    with pytest.raises(ValueError, match="beta must be >= 0 and finite"):
        trades_loss(logits, logits, y, beta=float("nan"))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_divergence(logits, logits, temperature=-1)


def test_analyses_give_the_model_back_in_its_mode():
    from actrain.analysis.compression import extract_features
    from actrain.analysis.entropy import mean_entropy

    model = create_model("small_cnn", in_channels=1, width=8).train()
    x = torch.rand(5, 1, 8, 8)
    mean_entropy(model, x)
    extract_features(model, x)
    assert model.training
    with pytest.raises(TypeError, match="expected float images"):
        mean_entropy(model, (x * 255).to(torch.uint8))


def test_weights_files_roles_and_models_not_built_by_actrain(tmp_path):
    model = create_model("small_cnn", in_channels=1, width=8)
    path = tmp_path / "f.safetensors"
    save_weights(path, model, {"role": "f"})
    assert isinstance(load_model(path), nn.Module)  # the model the file holds
    with pytest.raises(CheckpointError, match="holds model F, not G"):
        load_model(path, role="g")
    with pytest.raises(ValueError, match="role: 'g'"):
        load_model(path, role="F")
    with pytest.raises(TypeError, match="has no .spec"):
        save_weights(tmp_path / "x.safetensors", nn.Linear(2, 2))


def test_a_registered_architecture_is_a_valid_config_arch():
    from actrain.models import registry

    @register_model("api_test_mlp")
    def api_test_mlp(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        cfg = build_config({}, {"arch": "api_test_mlp", "dataset": "digits", "method": "madry"})
        assert cfg.arch == "api_test_mlp"
    finally:  # the registry is process-wide: other tests list it
        registry._REGISTRY.pop("api_test_mlp")
    with pytest.raises(TypeError, match="build_config: file_values must be a mapping"):
        build_config("configs/quickstart/digits_act.yaml", {})
