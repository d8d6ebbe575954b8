"""Model complexity (paper section 4.6, Fig. 3 left): Frobenius norms of the learnable layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


def weight_norms(model: nn.Module) -> list[dict[str, Any]]:
    """Frobenius norm of the weight of every learnable conv and linear layer, in network order.

    Network order is the order in which the modules are registered (``named_modules``), which
    for every actrain architecture is the order of the forward pass: stem, blocks (each block's
    convolutions, then its projection shortcut), classifier. BatchNorm scales are not included,
    as in the paper. Returns ``[{"index", "layer", "kind", "shape", "norm"}]``.
    """
    rows: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            kind = "conv"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        else:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
            continue
        with torch.no_grad():
            norm = float(torch.linalg.norm(weight.detach().double().flatten()))
        rows.append(
            {
                "index": len(rows),
                "layer": name,
                "kind": kind,
                "shape": list(weight.shape),
                "norm": norm,
            }
        )
    if not rows and any(isinstance(m, (_ConvNd, nn.Linear)) for m in model.modules()):
        raise ValueError(
            "weight_norms: every conv and linear weight is frozen (requires_grad False), and"
            " only learnable layers are counted; call model.requires_grad_(True) first"
        )
    return rows
