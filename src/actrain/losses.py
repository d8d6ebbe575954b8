"""Training losses and attack objectives, one pure function per method.

All functions compute in float32 whatever precision the logits come in, so that softmax,
log-softmax and KL are never evaluated in bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Callable

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
    return cross_entropy(logits_clean, target) + beta * kl_divergence(logits_clean, logits_adv)


def kl_from_fixed(
    p_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Callable[[Tensor], Tensor]:
    """``log_q -> KL(P || Q)`` for a P held fixed across calls (an attack's reference
    distribution), given log_q = log_softmax(q_logits / T).

    KL(P || Q) = sum p log p - sum p log q: P, and its first term, are computed here once
    instead of at every attack step; the gradient with respect to log_q is -p either way."""
    log_p = F.log_softmax(p_logits.detach().float() / temperature, dim=1)
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(dim=1)
    if reduction == "sum":
        neg_entropy_total = neg_entropy.sum()
        return lambda log_q: neg_entropy_total - (p * log_q).sum()
    if reduction == "batchmean":
        neg_entropy_mean = neg_entropy.mean()
        return lambda log_q: neg_entropy_mean - (p * log_q).sum() / log_q.shape[0]
    if reduction == "none":
        return lambda log_q: neg_entropy - (p * log_q).sum(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def log_softmax_at(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / T) in float32 (no division at T = 1, where it changes nothing)."""
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=1)


def trades_attack_objective_for(logits_clean_ref: Tensor) -> Callable[[Tensor], Tensor]:
    """What the TRADES attack maximises, KL(f(x) || f(x')) summed over the batch, with f(x)
    fixed: its distribution is computed once per attack, not once per step."""
    kl = kl_from_fixed(logits_clean_ref, reduction="sum")
    return lambda logits_adv: kl(log_softmax_at(logits_adv))


def trades_attack_objective(logits_adv: Tensor, logits_clean_ref: Tensor) -> Tensor:
    """What the TRADES attack maximises: KL(f(x) || f(x')) summed over the batch."""
    return trades_attack_objective_for(logits_clean_ref)(logits_adv)


def madry_attack_objective(logits_adv: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits_adv.float(), target, reduction="sum")


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
    scale = alpha * temperature**2
    loss_g = (1.0 - alpha) * cross_entropy(logits_g_adv, target) + scale * kl_divergence(
        logits_f_clean.detach(), logits_g_adv, temperature
    )
    loss_f = (1.0 - alpha) * cross_entropy(logits_f_clean, target) + scale * kl_divergence(
        logits_g_adv.detach(), logits_f_clean, temperature
    )
    return loss_g, loss_f


def act_attack_objective_for(
    logits_f_clean: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float = 1.0,
    kl_reduction: str = "sum",
) -> Callable[[Tensor], Tensor]:
    """``logits_g_adv -> L_G`` as the ACT attack maximises it, with F(x) held fixed.

    The released code sums the KL over the batch while averaging the CE, so the KL term
    dominates the sign of the gradient (``kl_reduction="sum"``, the default); ``"mean"`` is the
    literal Eq. (1). For alpha in {0, 1} both give the same gradient signs; in between, "sum"
    weighs the KL term batch-size times more than "mean" does.

    F(x)'s distribution is computed once per attack (:func:`kl_from_fixed`), at T = 1 the CE
    reuses the KL's log-softmax of G's logits, and a term weighted 0 is not computed: at
    batch 128 an attack step's loss is a handful of tiny kernels, and on a GPU their launches
    cost as much as the arithmetic.
    """
    kl = kl_from_fixed(logits_f_clean, temperature, "sum" if kl_reduction == "sum" else "batchmean")

    def objective(logits_g_adv: Tensor) -> Tensor:
        log_q = log_softmax_at(logits_g_adv, temperature)
        if alpha == 1.0:
            return kl(log_q)
        ce = (
            F.nll_loss(log_q, target) if temperature == 1.0 else cross_entropy(logits_g_adv, target)
        )
        return (1.0 - alpha) * ce if alpha == 0.0 else (1.0 - alpha) * ce + alpha * kl(log_q)

    return objective


def act_attack_objective(
    logits_g_adv: Tensor,
    logits_f_clean: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float = 1.0,
    kl_reduction: str = "sum",
) -> Tensor:
    """L_G as the ACT attack maximises it, with F(x) held fixed (see
    :func:`act_attack_objective_for`, which an attack uses to compute F's part once)."""
    return act_attack_objective_for(logits_f_clean, target, alpha, temperature, kl_reduction)(
        logits_g_adv
    )


def margin_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CW margin (max wrong logit - true logit) per example; > 0 means misclassified."""
    logits = logits.float()
    true = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, target[:, None], torch.finfo(other.dtype).min)
    return other.max(dim=1).values - true
