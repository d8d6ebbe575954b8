"""Pieces every attack shares: the threat model and a guard that restores the model's mode."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# An attack objective maps the model's logits on the current adversarial batch to a scalar
# that the attack maximises. Methods build these from their losses (see actrain.methods).
Objective = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@dataclass(frozen=True)
class LinfBall:
    """The L-infinity threat model around x, intersected with the image box [lower, upper].

    PGD is written once against ``random_perturb``/``step``/``project`` so another constraint
    (L2, say) only needs another small object like this one.
    """

    eps: float
    step_size: float
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self) -> None:
        # a string such as "8/255", or a negative radius, would otherwise attack quietly wrong
        for name in ("eps", "step_size", "lower", "upper"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()  # a 0-d tensor or NumPy scalar is a number too
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"LinfBall.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"LinfBall.{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        if not 0 <= self.eps <= self.upper - self.lower or self.step_size < 0:
            raise ValueError(
                f"LinfBall: need 0 <= eps <= upper - lower and step_size >= 0, got eps"
                f" {self.eps}, step_size {self.step_size}, box [{self.lower}, {self.upper}]"
            )

    def random_perturb(
        self, x: Tensor, start: str, generator: torch.Generator | None = None
    ) -> Tensor:
        """Starting point: ``uniform`` in the ball (Madry), ``gaussian`` x + 0.001 N(0, I)
        (TRADES and ACT's released code), or ``zero``."""
        if start == "zero" or self.eps == 0:
            return x.clone()
        if start == "uniform":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = (2 * noise - 1) * self.eps
        elif start == "gaussian":
            noise = 0.001 * torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype
            )
        else:
            raise ValueError(f"unknown attack start {start!r} (uniform, gaussian, zero)")
        return self.project(x + noise, x)

    def step(self, x_adv: Tensor, grad: Tensor) -> Tensor:
        return x_adv + self.step_size * grad.sign()

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps)
        return x_adv.clamp(self.lower, self.upper)


class TrainingAttack:
    """How the training loop gets the adversarial input of one weight update.

    The loop (``actrain.train.Trainer.train_step``) replays each mini-batch ``replays`` times;
    each replay is one update. An attack with ``uses_objective`` runs before the update, on G in
    eval mode, against the method's own objective (CE for Madry, KL for TRADES, L_G for ACT).
    Without it (Free-AT) the update's own backward supplies the input gradient:
    :meth:`perturb` returns a leaf that requires grad and :meth:`after_backward` reads its
    ``.grad``. State carried between mini-batches goes through ``state_dict`` into checkpoints,
    so resume stays exact.
    """

    name: str = "base"
    replays: int = 1
    uses_objective: bool = True

    def __init__(self, threat: LinfBall) -> None:
        self.threat = threat

    @property
    def attack_passes(self) -> int:
        """Forward+backward passes on G spent by the attack per update (for cost reports)."""
        return 0

    def perturb(
        self,
        model: nn.Module | None,
        x: Tensor,
        objective: Objective | None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> Tensor:
        raise NotImplementedError

    def after_backward(self, x: Tensor, x_adv: Tensor) -> None:
        """Called after each update's backward, before the optimiser step."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        del state
