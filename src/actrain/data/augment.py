"""Batched on-device augmentation for in-memory image tensors (no per-example Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip")


def to_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is passed through as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def sample_crop_flip_params(
    n: int, generator: torch.Generator, pad: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example (dy, dx, flip) drawn from `generator`; kept separate so they can be indexed."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    return dy, dx, flip


def crop_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    pad: int = 4,
) -> torch.Tensor:
    """Reflect-pad by `pad`, crop back to H x W at (dy, dx), mirror where `flip`; float [0, 1].

    One gather over the padded batch, so the cost does not grow with Python-level batch size.
    """
    x = to_float01(images)
    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = dy[:, None] + torch.arange(h, device=dev)  # [N, H]
    base = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - base, base) + dx[:, None]  # [N, W]
    n_idx = torch.arange(n, device=dev)[:, None, None, None]
    c_idx = torch.arange(c, device=dev)[None, :, None, None]
    return padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


def augment_batch(
    images: torch.Tensor, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply augmentation `kind` to a batch and return float32 in [0, 1]."""
    if kind == "none":
        return to_float01(images)
    if kind == "crop_flip":
        if generator is None:
            raise ValueError("crop_flip needs an explicit torch.Generator for reproducibility")
        dy, dx, flip = sample_crop_flip_params(images.shape[0], generator)
        return crop_flip(images, dy, dx, flip)
    raise ValueError(f"unknown augmentation '{kind}' (expected one of {', '.join(AUGMENTATIONS)})")
