"""Information compression (paper section 4.7, Fig. 3 right): a random-label probe.

The trained network's penultimate representation (``model.features(x)``) is frozen and a
2-layer MLP (400 and 200 hidden units, ReLU) is fitted on top of it to *fixed random binary
labels* of the training images. The better a representation compresses away information that
is irrelevant to its task, the harder it is to memorise random labels from it: lower fitting
accuracy = more compression (Lamb et al.; the ACT paper's Fig. 3 right).

For a fair comparison every model sees the same task: each image's random label is a function of
(seed, its index in the data set's standard order) only, and the MLP's initialisation and batch
order depend on the seed only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from actrain.attacks.base import eval_mode

HIDDEN = (400, 200)


def random_labels(indices: Tensor, seed: int = 0, num_labels: int = 2) -> Tensor:
    """Seeded random label of each example, a pure function of (seed, standard-order index).

    A hash (splitmix64) instead of a random stream means subsets and different training subsets
    of the same data set agree on the label of every image they share.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = idx + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z % np.uint64(num_labels)).astype(np.int64))


@torch.no_grad()
def extract_features(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Frozen penultimate features ``model.features(x)`` in eval mode, on the CPU, float32."""
    if not hasattr(model, "features"):
        raise TypeError(
            f"{type(model).__name__} has no features(x); cannot probe its representation"
        )
    device = next(model.parameters()).device
    with eval_mode(model):  # the caller's train/eval mode comes back (BN frozen only here)
        out = [
            model.features(x[s : s + batch_size].to(device).float()).float().flatten(1).cpu()
            for s in range(0, len(x), batch_size)
        ]
    return torch.cat(out)


def build_probe(dim: int, hidden: Sequence[int] = HIDDEN, num_labels: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_labels))
    return nn.Sequential(*layers)


def _accuracy(mlp: nn.Module, feats: Tensor, labels: Tensor, batch_size: int = 4096) -> float:
    correct = 0
    with torch.no_grad():
        for s in range(0, len(labels), batch_size):
            pred = mlp(feats[s : s + batch_size]).argmax(1)
            correct += int((pred == labels[s : s + batch_size]).sum())
    return 100.0 * correct / len(labels)


def random_label_probe(
    features: Tensor,
    labels: Tensor,
    *,
    hidden: Sequence[int] = HIDDEN,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    standardize: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Fit an MLP on frozen ``features`` [N, D] to ``labels`` [N]; the fitting curve per epoch.

    Adam (lr ``lr``), mini-batches of ``batch_size`` in a seeded order, cross-entropy. After every
    epoch the accuracy on all N examples is recorded (the fitting accuracy: how much of the
    random labelling the representation lets the MLP memorise). Returns ``final_acc`` (after the
    last epoch), ``best_acc``, ``curve`` (percent, one value per epoch), ``chance_acc`` (the
    majority label's share) and the settings. Deterministic for a fixed seed on a given machine.

    The probe runs on the CPU with ``threads`` intra-op threads (1 by default: the MLP is too
    small to gain from more, and one thread keeps it fast on a busy machine; ``None`` = as is).
    """
    if features.dim() != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"features must be [N, D] with N = len(labels) > 0, got {tuple(features.shape)} "
            f"and {len(labels)} labels"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(features, labels, hidden, epochs, lr, batch_size, seed, standardize)
    finally:
        torch.set_num_threads(previous)


def _fit(
    features: Tensor,
    labels: Tensor,
    hidden: Sequence[int],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    standardize: bool,
) -> dict[str, Any]:
    feats = features.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if standardize:
        feats = (feats - feats.mean(0)) / feats.std(0, unbiased=False).clamp_min(1e-6)
    num_labels = int(labels.max()) + 1 if len(labels) else 2
    num_labels = max(num_labels, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = build_probe(feats.shape[1], hidden, num_labels)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    curve: list[float] = []
    losses: list[float] = []
    n = len(labels)
    for _ in range(epochs):
        mlp.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch_size):
            b = order[s : s + batch_size]
            loss = loss_fn(mlp(feats[b]), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        losses.append(total / n)
        mlp.eval()
        curve.append(_accuracy(mlp, feats, labels))
    counts = torch.bincount(labels, minlength=num_labels)
    return {
        "final_acc": curve[-1],
        "best_acc": max(curve),
        "curve": curve,
        "loss_curve": losses,
        "chance_acc": 100.0 * float(counts.max()) / n,
        "n": n,
        "dim": int(feats.shape[1]),
        "hidden": list(hidden),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "standardize": standardize,
    }
