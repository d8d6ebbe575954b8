"""Training methods: each supplies what the shared loop needs and nothing else.

A method names its models (``g`` is the one used at inference; ACT adds the natural model
``f``), computes what its attack objective needs before the attack (``prepare``), builds the
objective the attack maximises, and returns its losses. The loop in :mod:`actrain.train`
does the rest identically for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from actrain import losses as L
from actrain.attacks import LinfBall, Objective, TrainingAttack, build_training_attack, eval_mode
from actrain.config import TrainConfig

Models = dict[str, nn.Module]


@dataclass
class StepLosses:
    losses: dict[str, Tensor]  # one loss per model role; each reaches only its own model
    logits: dict[str, Tensor]  # the logits each model was trained on, for accuracy metrics


@dataclass
class Method:
    name: str = "base"
    roles: tuple[str, ...] = ("g",)
    adversarial: bool = True
    start: str = "uniform"
    cfg: TrainConfig = field(default_factory=TrainConfig)

    def prepare(
        self, models: Models, x: Tensor, y: Tensor, for_attack: bool = True
    ) -> dict[str, Tensor]:
        """Forward passes needed by both the attack and the losses, computed once.

        ``for_attack`` False (Free-AT, whose attack is the update's own backward) lets a method
        skip forwards that only its attack objective needs.
        """
        return {}

    def attack_objective(self, ctx: dict[str, Tensor], y: Tensor) -> Objective:
        raise NotImplementedError

    def losses(
        self, models: Models, x: Tensor, x_adv: Tensor, y: Tensor, ctx: dict[str, Tensor]
    ) -> StepLosses:
        raise NotImplementedError


class Natural(Method):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__("natural", ("g",), adversarial=False, start="zero", cfg=cfg)

    def losses(self, models, x, x_adv, y, ctx):
        logits = models["g"](x)
        return StepLosses({"g": L.natural_loss(logits, y)}, {"g": logits})


class Madry(Method):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__("madry", ("g",), start="uniform", cfg=cfg)

    def attack_objective(self, ctx, y):
        return lambda logits_adv: L.madry_attack_objective(logits_adv, y)

    def losses(self, models, x, x_adv, y, ctx):
        logits_adv = models["g"](x_adv)
        return StepLosses({"g": L.madry_loss(logits_adv, y)}, {"g": logits_adv})


class Trades(Method):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__("trades", ("g",), start="gaussian", cfg=cfg)

    def prepare(self, models, x, y, for_attack=True):
        if not for_attack:
            return {}
        # TRADES' reference distribution for the attack comes from the model in eval mode.
        with eval_mode(models["g"]), torch.no_grad():
            return {"ref": models["g"](x)}

    def attack_objective(self, ctx, y):
        ref = ctx["ref"]
        return lambda logits_adv: L.trades_attack_objective(logits_adv, ref)

    def losses(self, models, x, x_adv, y, ctx):
        logits_clean = models["g"](x)
        logits_adv = models["g"](x_adv)
        loss = L.trades_loss(logits_clean, logits_adv, y, self.cfg.beta)
        return StepLosses({"g": loss}, {"g": logits_adv})


class ACT(Method):
    """Adversarial Concurrent Training, Algorithm 1 of the paper.

    1. F(x) once, in train mode (its output serves the attack, detached, and L_F).
    2. delta* = argmax_delta L_G(theta, phi, delta) by PGD on G in eval mode.
    3. L_G on G(x + delta*) and L_F on F(x), each detaching the other model's output.
    4. The shared loop steps both optimisers.

    Step 2 is whichever ``--train-attack`` is chosen: PGD-K, FGSM-RS (one step on the same L_G)
    or Free-AT (the input gradient of the L_G backward of each replay; F trains on x as always).
    """

    # issue 5: this process's share of the global batch (1/N under torchrun with N processes).
    batch_fraction: float = 1.0

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__("act", ("g", "f"), start="gaussian", cfg=cfg)

    def prepare(self, models, x, y, for_attack=True):
        return {"logits_f": models["f"](x)}

    def attack_objective(self, ctx, y):
        ref = ctx["logits_f"].detach()
        cfg = self.cfg
        a, t, red = cfg.alpha, cfg.attack_temperature, cfg.attack_kl_reduction
        s = self.batch_fraction
        if s == 1.0 or red != "sum":
            return lambda logits_adv: L.act_attack_objective(logits_adv, ref, y, a, t, red)
        # Under torchrun each process attacks its own shard. With the summed KL the CE mean
        # sets the balance of the two terms, so it is taken over the global batch (x s), as
        # one process with the whole batch would: the same attack whatever the process count.
        return lambda logits_adv: (
            (1.0 - a) * s * L.act_attack_objective(logits_adv, ref, y, 0.0, t, red)
            + a * L.act_attack_objective(logits_adv, ref, y, 1.0, t, red)
        )

    def losses(self, models, x, x_adv, y, ctx):
        logits_g = models["g"](x_adv)
        logits_f = ctx["logits_f"]
        loss_g, loss_f = L.act_losses(logits_g, logits_f, y, self.cfg.alpha, self.cfg.temperature)
        return StepLosses({"g": loss_g, "f": loss_f}, {"g": logits_g, "f": logits_f})


METHOD_CLASSES: dict[str, type[Method]] = {
    "natural": Natural,
    "madry": Madry,
    "trades": Trades,
    "act": ACT,
}


def build_method(cfg: TrainConfig) -> Method:
    method = METHOD_CLASSES[cfg.method](cfg)
    if cfg.attack_start != "auto" and method.adversarial:
        method.start = cfg.attack_start
    return method


def build_train_attack(cfg: TrainConfig, method: Method) -> TrainingAttack | None:
    """The ``--train-attack`` of ``method`` (None for natural training).

    PGD starts where the method's recipe does (``method.start``: uniform for Madry, x + 0.001 N
    for TRADES and ACT, or ``--attack-start``); FGSM-RS starts uniformly in the ball as Wong et
    al. prescribe unless ``--attack-start`` says otherwise; Free-AT starts from zero.
    """
    if not method.adversarial:
        return None
    threat = LinfBall(cfg.eps, cfg.step_size)
    start = method.start
    if cfg.train_attack == "fgsm-rs" and cfg.attack_start == "auto":
        start = "uniform"
    return build_training_attack(cfg.train_attack, threat, cfg.steps, start, cfg.replays)
