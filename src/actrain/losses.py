"""Training losses and attack objectives, one pure function per method.

All functions compute in float32 whatever precision the logits come in, so that softmax,
log-softmax and KL are never evaluated in bf16/fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_divergence(
    p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    """KL(P || Q) between softmax(p_logits / T) and softmax(q_logits / T).

    ``reduction`` is ``"batchmean"`` (sum over classes, mean over the batch: the mathematical
    KL averaged over examples), ``"sum"`` (summed over the batch, as TRADES' and ACT's released
    attack code do) or ``"none"`` (one value per example).
    """
    if not 0 < temperature < math.inf:
        raise ValueError(f"kl_divergence: temperature must be > 0 and finite, got {temperature}")
    log_p = F.log_softmax(p_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum()
    if reduction == "batchmean":
        return per_example.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), target)


def natural_loss(logits_clean: Tensor, target: Tensor) -> Tensor:
    """Standard training: CE on clean inputs."""
    return cross_entropy(logits_clean, target)


def madry_loss(logits_adv: Tensor, target: Tensor) -> Tensor:
    """Madry et al. PGD adversarial training: CE on the adversarial examples only."""
    return cross_entropy(logits_adv, target)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, target: Tensor, beta: float) -> Tensor:
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x')).

    As in the TRADES reference, the clean distribution is not detached in the robust term:
    gradients flow through both f(x) and f(x').
    """
    if not 0 <= beta < math.inf:
        raise ValueError(f"trades_loss: beta must be >= 0 and finite, got {beta}")
    return cross_entropy(logits_clean, target) + beta * kl_divergence(logits_clean, logits_adv)


def trades_attack_objective(logits_adv: Tensor, logits_clean_ref: Tensor) -> Tensor:
    """What the TRADES attack maximises: KL(f(x) || f(x')) summed over the batch."""
    return kl_divergence(logits_clean_ref.detach(), logits_adv, reduction="sum")


def madry_attack_objective(logits_adv: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits_adv.float(), target, reduction="sum")


def _check_alpha_temperature(alpha: float, temperature: float) -> None:
    """alpha outside [0, 1] makes a loss negative, T = 0 makes it NaN: both train quietly wrong."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"ACT: alpha must be in [0, 1], got {alpha}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"ACT: temperature must be > 0 and finite, got {temperature}")


def act_losses(
    logits_g_adv: Tensor,
    logits_f_clean: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float = 4.0,
) -> tuple[Tensor, Tensor]:
    """ACT's two losses, Eq. (1) and Eq. (2) of the paper.

    L_G = (1 - a) CE(G(x + d), y) + a T^2 KL(F(x) || G(x + d))   -- F(x) detached: only G learns
    L_F = (1 - a) CE(F(x), y)     + a T^2 KL(G(x + d) || F(x))   -- G(x + d) detached: only F learns

    ``temperature`` softens both distributions in the mimicry terms (the released code uses
    T = 4 with Hinton's T^2 scaling); T = 1 gives the paper's equations literally.
    """
    _check_alpha_temperature(alpha, temperature)
    scale = alpha * temperature**2
    loss_g = (1.0 - alpha) * cross_entropy(logits_g_adv, target) + scale * kl_divergence(
        logits_f_clean.detach(), logits_g_adv, temperature
    )
    loss_f = (1.0 - alpha) * cross_entropy(logits_f_clean, target) + scale * kl_divergence(
        logits_g_adv.detach(), logits_f_clean, temperature
    )
    return loss_g, loss_f


def act_attack_objective(
    logits_g_adv: Tensor,
    logits_f_clean: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float = 1.0,
    kl_reduction: str = "sum",
) -> Tensor:
    """L_G as the ACT attack maximises it, with F(x) held fixed.

    The released code sums the KL over the batch while averaging the CE, so the KL term
    dominates the sign of the gradient (``kl_reduction="sum"``, the default); ``"mean"`` is the
    literal Eq. (1). For alpha in {0, 1} both give the same gradient signs; in between, "sum"
    weighs the KL term batch-size times more than "mean" does.
    """
    _check_alpha_temperature(alpha, temperature)
    if kl_reduction not in ("sum", "mean"):
        raise ValueError(
            f"act_attack_objective: kl_reduction must be sum or mean, got {kl_reduction!r}"
        )
    reduction = "sum" if kl_reduction == "sum" else "batchmean"
    ce = cross_entropy(logits_g_adv, target)
    kl = kl_divergence(logits_f_clean.detach(), logits_g_adv, temperature, reduction=reduction)
    return (1.0 - alpha) * ce + alpha * kl


def margin_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CW margin (max wrong logit - true logit) per example; > 0 means misclassified."""
    logits = logits.float()
    true = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, target[:, None], torch.finfo(other.dtype).min)
    return other.max(dim=1).values - true
