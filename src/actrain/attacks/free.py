"""Free adversarial training (Shafahi et al. 2019, "Adversarial training for free!").

Each mini-batch is replayed m times. Every replay is one ordinary update on x + delta in train
mode whose single backward gives the weight gradient *and* the input gradient; then
delta <- Proj(delta + step * sign(grad_x)) with step = eps (the paper's choice; ``--step-size``
overrides it). delta is carried over to the next mini-batch instead of being restarted, so
the attack keeps refining across batches at no extra cost. The caller divides the number of
epochs by m so the total cost matches (see ``actrain.config.scheduled_epochs``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from actrain.attacks.base import LinfBall, TrainingAttack


class FreeTraining(TrainingAttack):
    """``--train-attack free --replays m``: the perturbation lives here between updates.

    ``delta`` has the shape of the largest batch seen; a smaller batch (the last of an epoch)
    uses and updates its first rows and leaves the others for the next full batch, as the
    reference implementation does. A batch of another image shape starts again from zero.
    """

    name = "free"
    uses_objective = False

    def __init__(self, threat: LinfBall, replays: int) -> None:
        super().__init__(threat)
        self.replays = replays
        self.delta: Tensor | None = None  # zero before the first batch

    def _rows(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        d = self.delta
        if d is not None and d.device != x.device:
            d = self.delta = d.to(x.device)
        if d is None or d.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x)
        elif d.shape[0] < n:
            self.delta = torch.cat([d, torch.zeros_like(x[d.shape[0] :])])
        return self.delta[:n]

    def perturb(self, model, x, objective, autocast=contextlib.nullcontext):
        """x + delta inside the ball and the box, as a leaf whose ``.grad`` the update fills."""
        del model, objective, autocast
        x = x.detach()
        x_adv = self.threat.project(x + self._rows(x).to(x.dtype), x)
        return x_adv.requires_grad_(True)

    @torch.no_grad()
    def after_backward(self, x: Tensor, x_adv: Tensor) -> None:
        if x_adv.grad is None:  # the method's losses do not depend on x_adv
            return
        x = x.detach()
        new = self.threat.project(self.threat.step(x_adv.detach(), x_adv.grad), x)
        self.delta[: x.shape[0]] = new - x

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.delta is None else {"delta": self.delta.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        delta = state.get("delta")
        self.delta = None if delta is None else delta.clone()
