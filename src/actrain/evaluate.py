"""``actrain eval``: clean accuracy and white-box PGD robustness of a trained model.

Numbers follow the paper's protocol: PGD-k in L-infinity with uniform random starts and R
restarts, an example counting as robust only if it survives every restart. Attacks run in
fp32 by default so that evaluation precision never weakens them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actrain import data as D
from actrain.attacks import pgd_robustness
from actrain.checkpoint import CheckpointError, load_model, run_config
from actrain.config import ConfigError
from actrain.runtime import autocast_factory, resolve_device, resolve_precision


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float = 0.003,
    steps: int = 20,
    restarts: int = 5,
    loss: str = "ce",
    batch_size: int = 256,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean and PGD accuracy (percent) on tensors already on the model's device."""
    device = next(model.parameters()).device
    autocast = autocast_factory(resolve_precision(precision, device), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    clean = robust = passes = 0
    robust_mask = torch.zeros(len(y), dtype=torch.bool, device=device)
    bar = tqdm(total=len(y), desc=f"PGD-{steps}x{restarts}", unit="img", disable=not progress)
    t0 = time.perf_counter()
    for s in range(0, len(y), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        res = pgd_robustness(
            model,
            xb,
            yb,
            eps,
            step_size,
            steps,
            restarts,
            loss=loss,
            autocast=autocast,
            generator=gen,
        )
        clean += int(res.clean_correct.sum())
        robust += int(res.robust.sum())
        passes += res.forward_passes
        robust_mask[s : s + len(yb)] = res.robust
        bar.update(len(yb))
        done = s + len(yb)
        bar.set_postfix(clean=f"{100 * clean / done:.1f}", robust=f"{100 * robust / done:.1f}")
    bar.close()
    n = len(y)
    full_cost = n * (1 + restarts * (steps + 1))
    return {
        "clean_acc": 100.0 * clean / n,
        "robust_acc": 100.0 * robust / n,
        "n": n,
        "robust_mask": robust_mask.cpu(),
        "attack_passes": passes,
        "attack_passes_without_early_stop": full_cost,
        "seconds": time.perf_counter() - t0,
    }


def load_eval_data(
    cfg: dict[str, Any], dataset: str | None, data_dir: str | None, subset: int | None, seed: int
) -> D.ImageTensors:
    name = dataset or cfg.get("dataset")
    if not name:
        raise ConfigError("--dataset: the model file names no dataset; pass --dataset")
    ddir = data_dir if data_dir is not None else cfg.get("data_dir")
    return D.load_split(
        name, "test", ddir, subset=subset, seed=seed, download=cfg.get("download", True)
    )


def evaluate_run(
    path: str,
    *,
    attack: str = "pgd",
    steps: int = 20,
    restarts: int = 5,
    eps: float = 8 / 255,
    step_size: float = 0.003,
    loss: str = "ce",
    test_subset: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    role: str = "g",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one run folder or weights file; returns the JSON-ready result."""
    if attack != "pgd":
        raise ConfigError(f"--attack: unknown attack '{attack}' (choices: pgd)")
    if not Path(path).exists():
        raise CheckpointError(f"no such run folder or weights file: {path}")
    dev = resolve_device(device)
    cfg = run_config(path)
    test = load_eval_data(cfg, dataset, data_dir, test_subset, seed)
    model = load_model(path, role=role, device=dev)
    x = test.images.float().div(255)
    out = robust_accuracy(
        model,
        x,
        test.labels,
        eps=eps,
        step_size=step_size,
        steps=steps,
        restarts=restarts,
        loss=loss,
        batch_size=batch_size,
        precision=precision,
        seed=seed,
        progress=progress,
    )
    mask = out.pop("robust_mask")
    return {
        "run": str(path),
        "model": role,
        "dataset": dataset or cfg.get("dataset"),
        "clean_acc": out["clean_acc"],
        "robust_acc": out["robust_acc"],
        "n": out["n"],
        "attack": {
            "name": f"PGD-{steps}",
            "norm": "Linf",
            "eps": eps,
            "step_size": step_size,
            "steps": steps,
            "restarts": restarts,
            "loss": loss,
            "start": "uniform",
            "precision": precision,
            "seed": seed,
        },
        "attack_passes": out["attack_passes"],
        "attack_passes_without_early_stop": out["attack_passes_without_early_stop"],
        "seconds": out["seconds"],
        "indices": test.indices.tolist(),
        "robust_examples": mask.nonzero().squeeze(1).tolist(),
    }


def write_json(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
