"""Attacks: one threat model and one PGD for every training method and for evaluation."""

from actrain.attacks.base import LinfBall, Objective, eval_mode
from actrain.attacks.pgd import RobustResult, pgd, pgd_robustness

__all__ = ["LinfBall", "Objective", "RobustResult", "eval_mode", "pgd", "pgd_robustness"]
