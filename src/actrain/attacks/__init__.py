"""Attacks: one threat model, PGD for every method and for evaluation, and the training attacks
(PGD, FGSM-RS, Free-AT) any adversarial method can train with."""

from actrain.attacks.base import LinfBall, Objective, TrainingAttack, eval_mode
from actrain.attacks.fgsm import fgsm, gradient_sign
from actrain.attacks.fgsm_rs import FGSMRSTraining, fgsm_rs
from actrain.attacks.free import FreeTraining
from actrain.attacks.minimum_perturbation import (
    MinPerturbation,
    fgsm_k_minimum_perturbation,
    pgd_search_minimum_perturbation,
)
from actrain.attacks.pgd import PGDTraining, RobustResult, pgd, pgd_robustness
from actrain.attacks.training import TRAIN_ATTACKS, build_training_attack

__all__ = [
    "TRAIN_ATTACKS",
    "FGSMRSTraining",
    "FreeTraining",
    "LinfBall",
    "MinPerturbation",
    "Objective",
    "PGDTraining",
    "RobustResult",
    "TrainingAttack",
    "build_training_attack",
    "eval_mode",
    "fgsm",
    "fgsm_k_minimum_perturbation",
    "fgsm_rs",
    "gradient_sign",
    "pgd",
    "pgd_robustness",
    "pgd_search_minimum_perturbation",
]
