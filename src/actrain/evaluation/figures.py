"""Figure 2 of the ACT paper: clean images, minimal adversarial examples, perturbations x5."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def save_examples(
    path: str | Path,
    x: Tensor,
    x_adv: Tensor,
    clean_pred: Tensor,
    adv_pred: Tensor,
    classes: list[str],
    title: str = "",
    scale: float = 5.0,
) -> Path:
    """Three rows: clean (predicted class), adversarial (predicted class and L∞ distance),
    perturbation x ``scale`` around mid-grey. ``x`` in [0, 1], [N, C, H, W] on the CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    dist = (x_adv - x).flatten(1).abs().amax(1)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.4), squeeze=False)

    def show(ax, img: Tensor, text: str) -> None:
        img = img.clamp(0, 1)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(text, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])

    def name(i: int) -> str:
        return classes[i] if 0 <= i < len(classes) else str(i)

    for i in range(n):
        show(axes[0, i], x[i], f"{name(int(clean_pred[i]))}")
        show(axes[1, i], x_adv[i], name(int(adv_pred[i])))
        # Below the image, not in a two-line title that would reach into the row above.
        axes[1, i].set_xlabel(f"L∞ {float(dist[i]):.4f}", fontsize=7)
        show(axes[2, i], 0.5 + scale * (x_adv[i] - x[i]), "")
    for row, text in enumerate(("clean", "adversarial", f"perturbation x{scale:g}")):
        axes[row, 0].set_ylabel(text, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick(found: Tensor, k: int) -> Tensor:
    """The first ``k`` positions where a minimal adversarial example was found."""
    return found.nonzero().squeeze(1)[:k].to(torch.long)
