"""FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better than free").

delta_0 ~ U(-eps, eps), one signed-gradient step of size alpha, projection onto the eps-ball and
the image box: one forward and one input-gradient backward per training step, against PGD-K's
K. Wong et al. take alpha = 1.25 eps (the default when ``--step-size`` is not given, see
``actrain.config``); larger steps make catastrophic overfitting likelier, which is why
training with it is watched by ``actrain.guard.OverfitGuard``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from actrain.attacks.base import LinfBall, Objective, TrainingAttack
from actrain.attacks.pgd import pgd


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    objective: Objective,
    threat: LinfBall,
    start: str = "uniform",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One step of ``threat.step_size`` from a random point of the ball, on ``objective``:
    PGD with K = 1 (eval mode, input gradient only), named for what training calls it."""
    return pgd(model, x, objective, threat, 1, start, autocast, generator)


class FGSMRSTraining(TrainingAttack):
    """``--train-attack fgsm-rs``: one :func:`fgsm_rs` step per update."""

    name = "fgsm-rs"

    def __init__(self, threat: LinfBall, start: str = "uniform") -> None:
        super().__init__(threat)
        self.start = start

    @property
    def attack_passes(self) -> int:
        return 1

    def perturb(self, model, x, objective, autocast=contextlib.nullcontext):
        return fgsm_rs(model, x, objective, self.threat, self.start, autocast)
