"""Projected gradient descent (Madry et al.) for any objective, in training and evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actrain.attacks.base import LinfBall, Objective, TrainingAttack, eval_mode
from actrain.losses import margin_loss


def _input_grad(
    model: nn.Module, x_adv: Tensor, objective: Objective, autocast
) -> tuple[Tensor, Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast():
            logits = model(x_adv)
        loss = objective(logits)
        # Gradient w.r.t. the input only: parameter .grad fields are never touched.
        (grad,) = torch.autograd.grad(loss, [x_adv])
    return grad, logits.detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    objective: Objective,
    threat: LinfBall,
    steps: int,
    start: str = "uniform",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    generator: torch.Generator | None = None,
) -> Tensor:
    """K steps of signed-gradient ascent on ``objective``, projected onto the threat model.

    The model is in eval mode during the attack (batch-norm statistics are neither used from
    the batch nor updated) and is returned in whatever mode it was in.
    """
    if steps < 0:
        raise ValueError(f"pgd: steps must be >= 0, got {steps}")
    x = x.detach()
    x_adv = threat.random_perturb(x, start, generator)
    return pgd_steps(model, x, x_adv, objective, threat, steps, autocast)


def pgd_steps(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    objective: Objective,
    threat: LinfBall,
    steps: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """The K steps of :func:`pgd` from the starting point ``x_adv`` (the part a CUDA graph
    replays: no host synchronisation, no random numbers)."""
    with eval_mode(model):
        for _ in range(steps):
            grad, _ = _input_grad(model, x_adv, objective, autocast)
            x_adv = threat.project(threat.step(x_adv, grad), x).detach()
    return x_adv


class PGDTraining(TrainingAttack):
    """``--train-attack pgd``: K steps of :func:`pgd` from the method's starting point."""

    name = "pgd"

    def __init__(self, threat: LinfBall, steps: int, start: str = "uniform") -> None:
        super().__init__(threat)
        self.steps = steps
        self.start = start

    @property
    def attack_passes(self) -> int:
        return self.steps

    def perturb(self, model, x, objective, autocast=contextlib.nullcontext):
        if self.steps == 0:
            return x  # K = 0: the clean batch (no random start either)
        return pgd(model, x, objective, self.threat, self.steps, self.start, autocast)


@dataclass
class RobustResult:
    """Per-example outcome of a white-box evaluation."""

    clean_correct: Tensor  # bool [N]
    robust: Tensor  # bool [N]: correct on the clean input and on every restart
    x_adv: Tensor  # worst example found (the adversarial one when broken)
    forward_passes: int  # examples x passes actually computed (shows the early-stop saving)


def eval_objective(loss: str, y: Tensor, target: Tensor | None = None) -> Objective:
    """Sum over the batch of the loss PGD maximises.

    Untargeted (``target`` None): CE or the CW margin of the true class ``y``. Targeted: the
    negative CE of ``target``, or the margin of ``target`` over every other class, so that
    ascending it pushes the prediction towards ``target``.
    """
    if target is not None:
        if loss == "ce":
            return lambda logits: -F.cross_entropy(logits.float(), target, reduction="sum")
        if loss in ("margin", "cw"):
            return lambda logits: -margin_loss(logits, target).sum()
        raise ValueError(f"unknown PGD loss {loss!r} (ce, margin)")
    if loss == "ce":
        return lambda logits: F.cross_entropy(logits.float(), y, reduction="sum")
    if loss in ("margin", "cw"):
        return lambda logits: margin_loss(logits, y).sum()
    raise ValueError(f"unknown PGD loss {loss!r} (ce, margin)")


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, autocast) -> Tensor:
    with autocast():
        return model(x).argmax(dim=1)


def confirm_on_model(model: nn.Module, x: Tensor, y: Tensor, fooled: Tensor, autocast) -> int:
    """Keep in ``fooled`` (in place) only the examples ``model`` itself misclassifies, for a
    verdict first reached on a gradient model; returns the forward passes spent."""
    hit = fooled.nonzero().squeeze(1)
    if hit.numel():
        fooled[hit] = _predict(model, x[hit], autocast) != y[hit]
    return hit.numel()


def pgd_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    loss: str = "ce",
    start: str = "uniform",
    early_stop: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    generator: torch.Generator | None = None,
    target: Tensor | None = None,
    gradient_model: nn.Module | None = None,
    verdict_autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> RobustResult:
    """PGD-k with R restarts, per-example worst case over restarts.

    An example is robust only if it is classified correctly at every iterate of every restart.
    With ``early_stop`` an example leaves the active set as soon as one iterate fools the model,
    so later steps and restarts spend nothing on it; the answer is the same because a broken
    example stays broken whatever else is tried.

    ``target`` (optional, one class per example) makes the attack targeted: PGD then pushes
    towards that class, and an example still counts as broken as soon as it is misclassified.

    ``gradient_model`` (e.g. :func:`actrain.runtime.gradient_model`, the same function with BN
    folded) supplies the input gradients; every verdict still comes from ``model``: an iterate
    the gradient model misclassifies is checked on ``model`` before it counts. The verdicts
    run under ``verdict_autocast`` (default: ``autocast``, the gradients' precision), so a
    bf16 search can be judged in fp32.
    """
    threat = LinfBall(eps, step_size)
    x = x.detach()
    steer = model if gradient_model is None else gradient_model
    judge = autocast if verdict_autocast is None else verdict_autocast
    checked = steer is not model or judge is not autocast  # verdicts need a pass of their own
    with eval_mode(model), eval_mode(steer):
        pred = _predict(model, x, judge)
        clean_correct = pred == y
        alive = clean_correct.clone()
        x_best = x.clone()
        passes = x.shape[0]
        for _ in range(max(restarts, 1)):
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xs, ys = x[idx], y[idx]
            x_adv = threat.random_perturb(xs, start, generator)
            active = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
            for _ in range(steps):
                sub = (
                    active.nonzero().squeeze(1)
                    if early_stop
                    else torch.arange(idx.numel(), device=x.device)
                )
                if sub.numel() == 0:
                    break
                ts = None if target is None else target[idx][sub]
                cur = x_adv[sub]
                grad, logits = _input_grad(steer, cur, eval_objective(loss, ys[sub], ts), autocast)
                passes += sub.numel()
                fooled = (logits.argmax(1) != ys[sub]) & active[sub]
                if checked:
                    passes += confirm_on_model(model, cur, ys[sub], fooled, judge)
                if fooled.any():
                    # Keep the iterate that fooled the model; it is a valid adversarial example.
                    hit = sub[fooled]
                    x_best[idx[hit]] = x_adv[hit]
                    active[hit] = False
                step = threat.project(threat.step(cur, grad), xs[sub])
                still = active[sub] if early_stop else torch.ones_like(fooled)
                x_adv[sub[still]] = step[still].detach()
            sub = active.nonzero().squeeze(1)
            if sub.numel():
                final = _predict(model, x_adv[sub], judge)
                passes += sub.numel()
                fooled = final != ys[sub]
                x_best[idx[sub[fooled]]] = x_adv[sub[fooled]]
                active[sub[fooled]] = False
                survivors = idx[active]
                x_best[survivors] = x_adv[active]
            alive[idx[~active]] = False
    return RobustResult(clean_correct, alive, x_best, passes)
