"""Compatibility module: the evaluation suite lives in :mod:`actrain.evaluation`.

``robust_accuracy(model, x, y, eps=, step_size=, steps=, restarts=)`` and ``evaluate_run(path)``
keep their signatures and their ``clean_acc``/``robust_acc`` keys (percent).
"""

from actrain.evaluation import (
    EvalOptions,
    evaluate_run,
    load_eval_data,
    robust_accuracy,
    write_json,
)

__all__ = ["EvalOptions", "evaluate_run", "load_eval_data", "robust_accuracy", "write_json"]
