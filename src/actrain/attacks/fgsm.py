"""FGSM (Goodfellow et al.): one signed-gradient step of size eps, no random start."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from actrain.attacks.base import LinfBall, eval_mode
from actrain.attacks.pgd import _input_grad, eval_objective


def gradient_sign(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str = "ce",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor]:
    """sign(d loss / d x) at the clean input and the clean logits (model in eval mode)."""
    with eval_mode(model):
        grad, logits = _input_grad(model, x.detach(), eval_objective(loss, y), autocast)
    return grad.sign(), logits


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    loss: str = "ce",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """x + eps * sign(grad), clipped to the image box."""
    sign, _ = gradient_sign(model, x, y, loss, autocast)
    return LinfBall(eps, eps).project(x.detach() + eps * sign, x.detach())


@torch.no_grad()
def fgsm_robust(model: nn.Module, x: Tensor, y: Tensor, eps: float, loss: str = "ce") -> Tensor:
    """Per-example bool: correct on the clean input and on its FGSM example."""
    x_adv = fgsm(model, x, y, eps, loss)
    with eval_mode(model):
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
