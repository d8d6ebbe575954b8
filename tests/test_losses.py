"""Loss values against hand computation, and where each loss's gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actrain.losses import (
    act_attack_objective,
    act_losses,
    kl_divergence,
    trades_attack_objective,
    trades_loss,
)


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _ce(row: list[float], y: int) -> float:
    return -math.log(_softmax(row)[y])


G = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
FL = [[1.0, 1.0, 0.0], [-0.5, 2.0, 0.0]]
Y = [0, 2]


def test_kl_matches_hand_computation():
    got = kl_divergence(torch.tensor(FL), torch.tensor(G), temperature=2.0, reduction="none")
    want = [_kl(_softmax(f, 2.0), _softmax(g, 2.0)) for f, g in zip(FL, G, strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert kl_divergence(
        torch.tensor(FL), torch.tensor(G), reduction="sum"
    ).item() == pytest.approx(
        sum(_kl(_softmax(f), _softmax(g)) for f, g in zip(FL, G, strict=True)), rel=1e-5
    )


@pytest.mark.parametrize("alpha,t", [(0.9, 4.0), (0.5, 1.0), (0.0, 4.0), (1.0, 2.0)])
def test_act_losses_values(alpha, t):
    loss_g, loss_f = act_losses(torch.tensor(G), torch.tensor(FL), torch.tensor(Y), alpha, t)
    n = len(Y)
    ce_g = sum(_ce(g, y) for g, y in zip(G, Y, strict=True)) / n
    ce_f = sum(_ce(f, y) for f, y in zip(FL, Y, strict=True)) / n
    kl_fg = sum(_kl(_softmax(f, t), _softmax(g, t)) for f, g in zip(FL, G, strict=True)) / n
    kl_gf = sum(_kl(_softmax(g, t), _softmax(f, t)) for f, g in zip(FL, G, strict=True)) / n
    assert loss_g.item() == pytest.approx((1 - alpha) * ce_g + alpha * t * t * kl_fg, rel=1e-5)
    assert loss_f.item() == pytest.approx((1 - alpha) * ce_f + alpha * t * t * kl_gf, rel=1e-5)


def test_act_attack_objective_sum_vs_mean():
    g, f, y = torch.tensor(G), torch.tensor(FL), torch.tensor(Y)
    ce = sum(_ce(r, t) for r, t in zip(G, Y, strict=True)) / 2
    kls = [_kl(_softmax(a), _softmax(b)) for a, b in zip(FL, G, strict=True)]
    s = act_attack_objective(g, f, y, 0.9, kl_reduction="sum").item()
    m = act_attack_objective(g, f, y, 0.9, kl_reduction="mean").item()
    assert s == pytest.approx(0.1 * ce + 0.9 * sum(kls), rel=1e-5)
    assert m == pytest.approx(0.1 * ce + 0.9 * sum(kls) / 2, rel=1e-5)


def test_trades_loss_value_and_attack_objective():
    clean, adv, y = torch.tensor(FL), torch.tensor(G), torch.tensor(Y)
    ce = sum(_ce(r, t) for r, t in zip(FL, Y, strict=True)) / 2
    kls = [_kl(_softmax(a), _softmax(b)) for a, b in zip(FL, G, strict=True)]
    assert trades_loss(clean, adv, y, 5.0).item() == pytest.approx(ce + 5 * sum(kls) / 2, rel=1e-5)
    assert trades_attack_objective(adv, clean).item() == pytest.approx(sum(kls), rel=1e-5)


def test_act_gradients_reach_only_their_own_model():
    torch.manual_seed(0)
    g_net, f_net = nn.Linear(5, 3), nn.Linear(5, 3)
    x, x_adv = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 0])
    loss_g, loss_f = act_losses(g_net(x_adv), f_net(x), y, alpha=0.9, temperature=4.0)

    loss_g.backward(retain_graph=True)
    assert g_net.weight.grad is not None and g_net.weight.grad.abs().sum() > 0
    assert f_net.weight.grad is None  # L_G leaves F untouched
    g_net.zero_grad(set_to_none=True)

    loss_f.backward()
    assert f_net.weight.grad is not None and f_net.weight.grad.abs().sum() > 0
    assert g_net.weight.grad is None  # L_F leaves G untouched


def test_act_losses_summed_backward_equals_separate():
    """The loop backpropagates L_G + L_F once; that must equal two separate backward passes."""
    torch.manual_seed(1)
    g_net, f_net = nn.Linear(5, 3), nn.Linear(5, 3)
    x, x_adv, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 3, (6,))
    lg, lf = act_losses(g_net(x_adv), f_net(x), y, 0.7, 4.0)
    gg = torch.autograd.grad(lg, [g_net.weight], retain_graph=True)[0]
    gf = torch.autograd.grad(lf, [f_net.weight], retain_graph=True)[0]
    sg, sf = torch.autograd.grad(lg + lf, [g_net.weight, f_net.weight])
    assert torch.allclose(gg, sg) and torch.allclose(gf, sf)


def test_losses_are_float32_under_bf16_logits():
    g = torch.tensor(G, dtype=torch.bfloat16)
    f = torch.tensor(FL, dtype=torch.bfloat16)
    lg, lf = act_losses(g, f, torch.tensor(Y), 0.9)
    assert lg.dtype == torch.float32 and lf.dtype == torch.float32
    ref = F.cross_entropy(g.float(), torch.tensor(Y))
    assert trades_loss(g, g, torch.tensor(Y), 5.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_losses_refuse_parameters_that_train_quietly_wrong():
    # alpha 2 made both ACT losses negative, T = 0 NaN, beta -1 rewarded the TRADES gap
    g, f, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for alpha, temperature in ((2.0, 4.0), (-0.1, 4.0), (0.5, 0.0)):
        with pytest.raises(ValueError, match="ACT"):
            act_losses(g, f, y, alpha, temperature)
        with pytest.raises(ValueError, match="ACT"):
            act_attack_objective(g, f, y, alpha, temperature or 0.0)
    with pytest.raises(ValueError, match="beta"):
        trades_loss(g, f, y, beta=-1.0)
