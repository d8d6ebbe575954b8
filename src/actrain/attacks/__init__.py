"""Attacks: one threat model and one PGD for every training method and for evaluation."""

from actrain.attacks.base import LinfBall, Objective, eval_mode
from actrain.attacks.fgsm import fgsm, gradient_sign
from actrain.attacks.minimum_perturbation import (
    MinPerturbation,
    fgsm_k_minimum_perturbation,
    pgd_search_minimum_perturbation,
)
from actrain.attacks.pgd import RobustResult, pgd, pgd_robustness

__all__ = [
    "LinfBall",
    "MinPerturbation",
    "Objective",
    "RobustResult",
    "eval_mode",
    "fgsm",
    "fgsm_k_minimum_perturbation",
    "gradient_sign",
    "pgd",
    "pgd_robustness",
    "pgd_search_minimum_perturbation",
]
