"""Posterior entropy (paper section 4.8, Fig. 4): mean softmax entropy over the training set."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from actrain.attacks.base import eval_mode


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of ``softmax(logits)`` per row, computed in float64.

    ``-sum p log p`` with ``log p = log_softmax``, so one-hot-like rows give exactly 0 and
    uniform rows ``log C`` without ``0 * log 0`` problems.
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def mean_entropy(model: nn.Module, x: Tensor, batch_size: int = 512) -> float:
    """Average over the rows of ``x`` (images in [0, 1]) of the entropy of the model's softmax.

    The model runs in eval mode (BatchNorm running statistics, as at test time) and is given
    back in the mode it came in.
    """
    if len(x) == 0:
        raise ValueError("mean_entropy needs at least one input")
    if not x.is_floating_point():
        raise TypeError(f"mean_entropy: expected float images in [0, 1], got {x.dtype} (x / 255)")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    with eval_mode(model):
        for s in range(0, len(x), batch_size):
            logits = model(x[s : s + batch_size].to(device).float())
            total += softmax_entropy(logits).sum().cpu()
    return float(total / len(x))
