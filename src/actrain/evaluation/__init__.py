"""The evaluation suite: white-box PGD, AutoAttack, minimum perturbation, eps sweep, black-box
transfer and gradient-masking checks, with JSON and Markdown reports (``actrain eval``)."""

from actrain.evaluation.protocols import (
    PAPER_EPS_SWEEP,
    PAPER_PGD_STEPS,
    autoattack_accuracy,
    clean_accuracy,
    eps_sweep,
    fgsm_accuracy,
    minimum_perturbation,
    robust_accuracy,
    square_accuracy,
    transfer_examples,
    transfer_success,
)
from actrain.evaluation.report import aggregate, markdown, table3
from actrain.evaluation.sanity import sanity_checks
from actrain.evaluation.suite import (
    EvalOptions,
    evaluate_loaded,
    evaluate_model,
    evaluate_run,
    load_eval_data,
    transfer_matrix,
    write_json,
)

__all__ = [
    "PAPER_EPS_SWEEP",
    "PAPER_PGD_STEPS",
    "EvalOptions",
    "aggregate",
    "autoattack_accuracy",
    "clean_accuracy",
    "eps_sweep",
    "evaluate_loaded",
    "evaluate_model",
    "evaluate_run",
    "fgsm_accuracy",
    "load_eval_data",
    "markdown",
    "minimum_perturbation",
    "robust_accuracy",
    "sanity_checks",
    "square_accuracy",
    "table3",
    "transfer_examples",
    "transfer_matrix",
    "transfer_success",
    "write_json",
]
