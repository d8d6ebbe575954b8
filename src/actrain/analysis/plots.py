"""Matplotlib figures (headless Agg backend) for the analyses, training curves and sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Series = tuple[str, Sequence[float]]
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def _mean_std(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std over repeats of unequal length (per position, over those present)."""
    length = max(len(v) for v in values)
    arr = np.full((len(values), length), np.nan)
    for i, v in enumerate(values):
        arr[i, : len(v)] = v
    mean = np.nanmean(arr, axis=0)
    count = np.sum(~np.isnan(arr), axis=0)
    std = np.zeros(length)
    many = count > 1
    if many.any():
        std[many] = np.nanstd(arr[:, many], axis=0, ddof=1)
    return mean, std


def plot_norms(
    series: Sequence[tuple[str, Sequence[Sequence[float]]]],
    layers: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Fig. 3 left: Frobenius norm per learnable layer, one line per method (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = np.arange(1, len(layers) + 1)
    for i, (label, repeats) in enumerate(series):
        mean, std = _mean_std(repeats)
        c = COLORS[i % len(COLORS)]
        ax.plot(x[: len(mean)], mean, marker="o", ms=3, label=label, color=c)
        if len(repeats) > 1:
            ax.fill_between(x[: len(mean)], mean - std, mean + std, color=c, alpha=0.2)
    ax.set_xlabel("learnable layer (network order)")
    ax.set_ylabel("Frobenius norm of weights")
    if len(layers) <= 12:
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Model complexity (Fig. 3 left)")
    return _save(fig, path)


def plot_probe(
    series: Sequence[tuple[str, Sequence[Sequence[float]]]],
    path: str | Path,
    chance: float | None = None,
    title: str = "",
) -> Path:
    """Fig. 3 right: random-label fitting accuracy per probe epoch, one line per model."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, repeats) in enumerate(series):
        mean, std = _mean_std(repeats)
        x = np.arange(1, len(mean) + 1)
        c = COLORS[i % len(COLORS)]
        ax.plot(x, mean, label=label, color=c)
        if len(repeats) > 1:
            ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("MLP epoch")
    ax.set_ylabel("accuracy on random labels (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Information compression (Fig. 3 right): lower = more compression")
    return _save(fig, path)


def plot_bars(
    groups: dict[str, Sequence[tuple[str, float, float]]],
    path: str | Path,
    ylabel: str,
    title: str = "",
    refs: dict[str, float] | None = None,
) -> Path:
    """Grouped bar plot: one group per key (e.g. data set), bars (label, mean, std) in it.

    ``refs`` draws a dotted reference level per group (e.g. log C, the maximum entropy)."""
    labels: list[str] = []
    for bars in groups.values():
        for label, _, _ in bars:
            if label not in labels:
                labels.append(label)
    n = max(1, len(labels))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.1 * len(groups) * n * 0.6), 4))
    xs = np.arange(len(groups))
    for j, label in enumerate(labels):
        means, stds, pos = [], [], []
        for i, bars in enumerate(groups.values()):
            for bl, m, s in bars:
                if bl == label:
                    means.append(m)
                    stds.append(s)
                    pos.append(xs[i] - 0.4 + width * (j + 0.5))
        bars_ = ax.bar(pos, means, width, yerr=stds, capsize=3, label=label, color=COLORS[j % 10])
        ax.bar_label(bars_, fmt="%.3f", fontsize=7, padding=2)
    for i, key in enumerate(groups):
        if refs and key in refs:
            ax.hlines(refs[key], xs[i] - 0.45, xs[i] + 0.45, colors="grey", linestyles=":")
            ax.annotate("max", (xs[i] + 0.45, refs[key]), fontsize=7, color="grey")
    ax.set_xticks(xs, list(groups))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_training_curves(
    panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[Sequence[float]], Sequence[int]]]]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One figure with a panel per quantity; each line = (label, repeats, epochs).

    A line's colour follows the first word of its label (the model: G, F) across panels and
    lines whose label mentions "train" are dashed.
    """
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharex=True
    )
    colour_of: dict[str, str] = {}
    for ax, (ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, repeats, epochs in lines:
            mean, std = _mean_std(repeats)
            x = np.asarray(list(epochs)[: len(mean)])
            key = label.split()[0]
            c = colour_of.setdefault(key, COLORS[len(colour_of) % len(COLORS)])
            style = "--" if "train" in label else "-"
            ax.plot(x, mean[: len(x)], style, marker="o", ms=3, label=label, color=c)
            if len(repeats) > 1 and len(x) == 1:
                ax.errorbar(x, mean[:1], yerr=std[:1], color=c, capsize=4, fmt="none")
            elif len(repeats) > 1:
                lo, hi = (mean - std)[: len(x)], (mean + std)[: len(x)]
                ax.fill_between(x, lo, hi, color=c, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_sweep(
    param: str,
    values: Sequence[float],
    lines: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Accuracy against a swept parameter (Table 1 as a plot); lines = (label, means, stds)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, means, stds) in enumerate(lines):
        ax.errorbar(
            values, means, yerr=stds, marker="o", capsize=3, label=label, color=COLORS[i % 10]
        )
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)
