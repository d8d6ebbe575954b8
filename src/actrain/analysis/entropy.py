"""Posterior entropy (paper section 4.8, Fig. 4): mean softmax entropy over the training set."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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

    The model is put in eval mode (BatchNorm running statistics, as at test time).
    """
    if len(x) == 0:
        raise ValueError("mean_entropy needs at least one input")
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, len(x), batch_size):
        logits = model(x[s : s + batch_size].to(device).float())
        total += softmax_entropy(logits).sum().cpu()
    return float(total / len(x))
