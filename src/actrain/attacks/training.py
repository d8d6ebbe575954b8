"""The training attacks every adversarial method can use (``--train-attack``, issue 8).

Each attack lives in its own module (:mod:`~actrain.attacks.pgd`,
:mod:`~actrain.attacks.fgsm_rs`, :mod:`~actrain.attacks.free`) and implements
:class:`~actrain.attacks.base.TrainingAttack`; the method supplies the objective, so Madry
attacks its CE, TRADES its KL and ACT its L_G whichever attack is chosen.
"""

from __future__ import annotations

from actrain.attacks.base import LinfBall, TrainingAttack
from actrain.attacks.fgsm_rs import FGSMRSTraining
from actrain.attacks.free import FreeTraining
from actrain.attacks.pgd import PGDTraining
from actrain.config import TRAIN_ATTACKS  # defined there: flags are checked without torch

__all__ = ["TRAIN_ATTACKS", "build_training_attack"]


def build_training_attack(
    name: str, threat: LinfBall, steps: int, start: str, replays: int = 1
) -> TrainingAttack:
    """``start`` is the method's starting point (PGD) or the one the user chose; FGSM-RS starts
    uniformly in the ball unless told otherwise, and Free-AT always starts from zero."""
    if name == "pgd":
        return PGDTraining(threat, steps, start)
    if name == "fgsm-rs":
        return FGSMRSTraining(threat, start)
    if name == "free":
        return FreeTraining(threat, replays)
    raise ValueError(f"unknown training attack {name!r} ({', '.join(TRAIN_ATTACKS)})")
