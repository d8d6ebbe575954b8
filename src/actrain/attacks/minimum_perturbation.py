"""Smallest L-infinity perturbation that changes a prediction, estimated two ways.

``fgsm_k_minimum_perturbation`` is the measurement behind the ACT paper's Table 2 (foolbox's
FGSM with a sweep of epsilons): one gradient sign at the clean input, then increasing step
lengths until the prediction changes, with a finer second sweep when the first hit comes early.
``pgd_search_minimum_perturbation`` is stronger: a per-example bisection over eps, each probe
an iterative PGD attack; its answer is the L-infinity distance of an adversarial example it
actually found, so it can only be an upper bound on the true minimum, and a tighter one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from actrain.attacks.base import eval_mode
from actrain.attacks.fgsm import gradient_sign
from actrain.attacks.pgd import _input_grad, _predict, confirm_on_model, eval_objective


@dataclass
class MinPerturbation:
    """Per-example result. ``distance`` is 0 for examples misclassified to begin with and
    ``inf`` where no adversarial example was found; ``x_adv`` is the closest one found."""

    clean_correct: Tensor  # bool [N]
    found: Tensor  # bool [N]: an adversarial example was found (clean-correct examples only)
    distance: Tensor  # float [N]
    x_adv: Tensor
    forward_passes: int


def linf_distance(x_adv: Tensor, x: Tensor) -> Tensor:
    return (x_adv - x).flatten(1).abs().amax(1)


def fgsm_k_minimum_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    max_eps: float = 1.0,
    num_eps: int = 1000,
    refine: int = 20,
    loss: str = "ce",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> MinPerturbation:
    """FGSM^k as in foolbox's ``FGSM(epsilons=1000, max_epsilon=1)``.

    Steps eps over ``linspace(0, max_eps, num_eps + 1)[1:]`` along sign(grad) at x; each example
    stops at its first success. If that happens within the first ``refine`` values, the sweep is
    repeated over ``linspace(0, eps_hit, refine + 1)[1:]`` (foolbox's "repeat with smaller
    epsilons"). The distance is the L-infinity norm of the clipped adversarial image.
    """
    x = x.detach()
    with eval_mode(model):
        sign, logits = gradient_sign(model, x, y, loss, autocast)
        clean_correct = logits.argmax(1) == y
        n = x.shape[0]
        distance = torch.where(clean_correct, math.inf, 0.0).to(x.device, torch.float32)
        x_best = x.clone()
        passes = n

        def sweep(idx: Tensor, epsilons: Tensor) -> tuple[Tensor, Tensor]:
            """First index into ``epsilons`` that fools each example in ``idx`` (-1: none)."""
            nonlocal passes
            hit_at = torch.full((idx.numel(),), -1, dtype=torch.long, device=x.device)
            for i, e in enumerate(epsilons.tolist()):
                live = (hit_at < 0).nonzero().squeeze(1)
                if live.numel() == 0:
                    break
                rows = idx[live]
                cand = (x[rows] + e * sign[rows]).clamp(0, 1)
                passes += rows.numel()
                fooled = _predict(model, cand, autocast) != y[rows]
                hit_at[live[fooled]] = i
                found = rows[fooled]
                x_best[found] = cand[fooled]
            return hit_at, epsilons

        idx = clean_correct.nonzero().squeeze(1)
        grid = torch.linspace(0, max_eps, num_eps + 1)[1:]
        hit_at, _ = sweep(idx, grid)
        early = (hit_at >= 0) & (hit_at < refine)
        for j in early.nonzero().squeeze(1).tolist():
            # foolbox refines each early hit on its own finer grid below the hit
            fine = torch.linspace(0, float(grid[hit_at[j]]), refine + 1)[1:]
            sweep(idx[j : j + 1], fine)
        hit = idx[hit_at >= 0]
        distance[hit] = linf_distance(x_best[hit], x[hit]).float()
    found = torch.isfinite(distance) & clean_correct
    return MinPerturbation(clean_correct, found, distance, x_best, passes)


def _pgd_per_example_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    steps: int,
    loss: str,
    generator: torch.Generator | None,
    autocast,
    steer: nn.Module,
    judge,
) -> tuple[Tensor, Tensor, int]:
    """PGD with one eps per example (step 2.5 eps / steps, uniform start), its gradients from
    ``steer`` under ``autocast``, its verdicts from ``model`` under ``judge``; returns (fooled
    mask, the fooling iterate or the last one, forward passes)."""
    checked = steer is not model or judge is not autocast
    e = eps.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    step = 2.5 * e / max(steps, 1)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + (2 * noise - 1) * e).clamp(0, 1)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best = x_adv.clone()
    passes = 0
    for _ in range(steps):
        live = (~fooled).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        cur = x_adv[live]
        grad, logits = _input_grad(steer, cur, eval_objective(loss, y[live]), autocast)
        passes += live.numel()
        now = logits.argmax(1) != y[live]
        if checked:
            passes += confirm_on_model(model, cur, y[live], now, judge)
        best[live[now]] = x_adv[live[now]]
        fooled[live[now]] = True
        nxt = cur + step[live] * grad.sign()
        nxt = torch.minimum(torch.maximum(nxt, x[live] - e[live]), x[live] + e[live]).clamp(0, 1)
        x_adv[live] = nxt.detach()
    live = (~fooled).nonzero().squeeze(1)
    if live.numel():
        now = _predict(model, x_adv[live], judge) != y[live]
        passes += live.numel()
        fooled[live[now]] = True
        best[live] = x_adv[live]
    return fooled, best, passes


def pgd_search_minimum_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    start: MinPerturbation | None = None,
    max_eps: float = 1.0,
    steps: int = 20,
    search_steps: int = 10,
    loss: str = "ce",
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    gradient_model: nn.Module | None = None,
    verdict_autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> MinPerturbation:
    """Bisection over eps per example, each probe a PGD-``steps`` attack (input gradients from
    ``gradient_model`` if given, verdicts under ``verdict_autocast`` if given, as in
    :func:`actrain.attacks.pgd_robustness`).

    ``start`` (e.g. the FGSM^k result on the same examples) supplies a known adversarial
    example as the first upper bound; examples without one first get a PGD probe at
    ``max_eps``. After ``search_steps`` halvings the answer is within (hi - lo) of the smallest
    eps at which this PGD succeeds, and it is always the distance of an adversarial example
    actually found (kept in ``x_adv``), never larger than the ``start`` distance.
    """
    x = x.detach()
    steer = model if gradient_model is None else gradient_model
    judge = autocast if verdict_autocast is None else verdict_autocast
    with eval_mode(model), eval_mode(steer):
        clean_correct = _predict(model, x, judge) == y
        n = x.shape[0]
        passes = n
        hi = torch.full((n,), math.inf, device=x.device)
        x_best = x.clone()
        if start is not None:
            known = clean_correct & start.found.to(x.device)
            hi[known] = start.distance.to(x.device, torch.float32)[known]
            x_best[known] = start.x_adv.to(x.device)[known]
        todo = (clean_correct & ~torch.isfinite(hi)).nonzero().squeeze(1)
        if todo.numel():
            probe = torch.full((todo.numel(),), max_eps, device=x.device)
            fooled, adv, p = _pgd_per_example_eps(
                model, x[todo], y[todo], probe, steps, loss, generator, autocast, steer, judge
            )
            passes += p
            ok = todo[fooled]
            x_best[ok] = adv[fooled]
            hi[ok] = linf_distance(adv[fooled], x[ok]).float()
        lo = torch.zeros(n, device=x.device)
        active = (clean_correct & torch.isfinite(hi)).nonzero().squeeze(1)
        for _ in range(search_steps):
            if active.numel() == 0:
                break
            mid = (lo[active] + hi[active]) / 2
            fooled, adv, p = _pgd_per_example_eps(
                model, x[active], y[active], mid, steps, loss, generator, autocast, steer, judge
            )
            passes += p
            dist = linf_distance(adv, x[active]).float()
            better = fooled & (dist < hi[active])
            ok = active[better]
            x_best[ok] = adv[better]
            hi[ok] = dist[better]
            bad = active[~fooled]
            lo[bad] = mid[~fooled]
        distance = torch.where(clean_correct, hi, torch.zeros_like(hi))
    found = clean_correct & torch.isfinite(distance)
    return MinPerturbation(clean_correct, found, distance, x_best, passes)
