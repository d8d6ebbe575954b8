"""The shared PGD: stays in the threat model, raises its objective, leaves the model alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from actrain.attacks import LinfBall, eval_mode, pgd, pgd_robustness
from actrain.losses import act_attack_objective
from actrain.models import create_model

_DIGITS = load_digits()
_X = torch.tensor(_DIGITS.images, dtype=torch.float32).unsqueeze(1) / 16.0
_Y = torch.tensor(_DIGITS.target)
_TRAINED: dict[str, nn.Module] = {}


def _model() -> nn.Module:
    """A small CNN fitted for a few seconds to real digits, so attacks have something to break."""
    if "m" not in _TRAINED:
        torch.manual_seed(0)
        model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(8):
            for s in range(200, len(_Y), 64):
                loss = F.cross_entropy(model(_X[s : s + 64]), _Y[s : s + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
        _TRAINED["m"] = model.eval()
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    model.load_state_dict(_TRAINED["m"].state_dict())
    return model


def _batch(n: int = 16):
    return _X[:n].clone(), _Y[:n].clone()


def test_linf_ball_project_and_starts():
    x = torch.rand(4, 3, 5, 5)
    ball = LinfBall(eps=0.1, step_size=0.02)
    for start in ("uniform", "gaussian", "zero"):
        x0 = ball.random_perturb(x, start)
        assert (x0 - x).abs().max() <= 0.1 + 1e-7
        assert x0.min() >= 0 and x0.max() <= 1
    gauss = ball.random_perturb(x, "gaussian") - x
    assert gauss.abs().max() < 0.01  # TRADES/ACT start: x + 0.001 N(0, I)
    far = ball.project(x + 5.0, x)
    assert torch.allclose(far, torch.minimum(x + 0.1, torch.ones_like(x)))


def test_pgd_inside_ball_raises_objective_and_keeps_model_state():
    model = _model()
    model.train()
    x, y = _batch()
    ball = LinfBall(eps=0.1, step_size=0.02)

    def objective(logits):
        return F.cross_entropy(logits, y, reduction="sum")

    with torch.no_grad(), eval_mode(model):
        before = objective(model(x)).item()
    bn_before = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = pgd(model, x, objective, ball, steps=10, start="uniform")
    assert model.training  # restored
    assert all(m.training for m in model.modules())
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad(), eval_mode(model):
        after = objective(model(x_adv)).item()
    assert after > before * 1.2
    assert all(p.grad is None for p in model.parameters())  # parameter grads untouched
    for k, v in model.state_dict().items():  # BN running stats not updated (eval mode)
        assert torch.equal(v, bn_before[k]), k


def test_pgd_keeps_eval_mode_and_existing_grads():
    model = _model().eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    x, y = _batch()
    pgd(model, x, lambda z: F.cross_entropy(z, y), LinfBall(0.1, 0.02), steps=3)
    assert not model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_pgd_maximises_act_objective():
    model = _model()
    f_logits = torch.randn(16, 10)
    x, y = _batch()

    def objective(z):
        return act_attack_objective(z, f_logits, y, alpha=0.9)

    with torch.no_grad(), eval_mode(model):
        before = objective(model(x)).item()
        x_adv = pgd(model, x, objective, LinfBall(0.1, 0.02), steps=10, start="gaussian")
        after = objective(model(x_adv)).item()
    assert after > before


def test_pgd_robustness_restarts_and_early_stop():
    model = _model()
    x, y = _batch(32)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # every example starts correctly classified
    assert (y == _Y[:32]).float().mean() > 0.8  # the model has learnt the task
    one = pgd_robustness(
        model, x, y, 0.1, 0.02, 10, restarts=1, generator=torch.Generator().manual_seed(0)
    )
    many = pgd_robustness(
        model, x, y, 0.1, 0.02, 10, restarts=4, generator=torch.Generator().manual_seed(0)
    )
    assert one.clean_correct.all()
    assert many.robust.sum() <= one.robust.sum()
    assert not (many.robust & ~one.robust).any()  # worst case over restarts <= first restart
    full = pgd_robustness(
        model,
        x,
        y,
        0.1,
        0.02,
        10,
        restarts=4,
        early_stop=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(full.robust, many.robust)
    assert many.forward_passes < full.forward_passes
    # every broken example comes with an adversarial example inside the ball that fools it
    broken = ~many.robust
    assert (many.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert 0 < many.robust.sum() < 32
    with torch.no_grad():
        pred = model(many.x_adv).argmax(1)
    assert (pred[broken] != y[broken]).all()


@pytest.mark.parametrize(
    "kw,error",
    [
        ({"eps": -0.1, "step_size": 0.01}, ValueError),
        ({"eps": 2.0, "step_size": 0.01}, ValueError),  # larger than the image box
        ({"eps": 0.1, "step_size": -0.01}, ValueError),
        ({"eps": "8/255", "step_size": 0.01}, TypeError),  # once accepted, attacks then failed
    ],
)
def test_the_threat_model_refuses_what_would_attack_wrongly(kw, error):
    with pytest.raises(error, match="LinfBall"):
        LinfBall(**kw)


def test_pgd_refuses_negative_steps():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        pgd(model, torch.rand(2, 4), lambda z: z.sum(), LinfBall(0.1, 0.02), steps=-1)
