"""All analyses of one run (norms, random-label probe, entropy), saved in ``RUN/analysis/``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from actrain import data as D
from actrain.analysis.compression import extract_features, random_label_probe, random_labels
from actrain.analysis.entropy import mean_entropy
from actrain.analysis.norms import weight_norms
from actrain.analysis.runs import ANALYSIS, Run, load_run
from actrain.checkpoint import atomic_write_text, load_model
from actrain.commands import UsageError


def training_images(
    config: dict[str, Any],
    data_dir: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> D.ImageTensors:
    """The run's training set as it was trained on (same subset, validation hold-out removed),
    optionally reduced to a class-balanced seeded subset of ``max_samples``."""
    name = config.get("dataset")
    info = D.get_dataset_info(name)
    ddir = data_dir if data_dir is not None else config.get("data_dir")
    if not info.in_memory:  # ImageNet-style folders: a subset of train/, centre-cropped
        if ddir is None:
            raise UsageError(f"--data-dir: required for {name} runs (train/ inside)")
        return D.load_folder_split(
            ddir, subset=max_samples, seed=seed, split="train", flag="--max-samples", at_most=True
        )
    train = D.load_split(
        name,
        "train",
        ddir,
        subset=config.get("train_subset"),
        seed=int(config.get("seed", 0)),
        download=bool(config.get("download", True)),
    )
    if config.get("val_size"):
        train, _ = D.train_val_split(
            train, int(config["val_size"]), seed=int(config.get("seed", 0))
        )
    if max_samples is not None and max_samples < len(train):
        train = train.select(D.balanced_subset_indices(train.labels, max_samples, seed))
    return train


def analyze_run(
    path: str | Path,
    *,
    roles: list[str] | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
    probe_epochs: int = 30,
    probe_seed: int = 0,
    probe_lr: float = 1e-3,
    probe_batch_size: int = 128,
    probe_standardize: bool = False,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    command: str | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Norms, random-label probe and posterior entropy of every model of a run.

    Written to ``RUN/analysis/analysis.json`` (when ``save``) and returned.
    """
    run: Run = load_run(path)
    roles = roles or run.roles
    t0 = time.perf_counter()
    train = training_images(run.config, data_dir, max_samples, seed=probe_seed)
    x = train.images.float().div(255)
    labels = random_labels(train.indices, probe_seed)
    models: dict[str, Any] = {}
    for role in roles:
        if role not in run.roles:
            raise UsageError(f"{run.path}: no model '{role}' (this run has {', '.join(run.roles)})")
        model = load_model(run.path, role=role, device=device)
        feats = extract_features(model, x, batch_size)
        probe = random_label_probe(
            feats,
            labels,
            epochs=probe_epochs,
            lr=probe_lr,
            batch_size=probe_batch_size,
            seed=probe_seed,
            standardize=probe_standardize,
        )
        models[role] = {
            "norms": weight_norms(model),
            "entropy": mean_entropy(model, x, batch_size),
            "probe": probe,
            # its own settings: a later `--model f` with others keeps G's beside them
            "samples": len(train),
            "command": command,
        }
    result = {
        "run": str(run.path),
        "method": run.method,
        "dataset": run.dataset,
        "arch": run.arch,
        "seed": run.seed,
        "epoch": run.epochs_done,  # of the weights analysed: a resumed run makes this stale
        "samples": len(train),
        "num_classes": train.num_classes,  # log(C), the entropy's maximum (a folder has its own)
        "sample_indices_sum": int(train.indices.sum()),
        "entropy_unit": "nats",
        "models": models,
        "seconds": time.perf_counter() - t0,
        "command": command,
    }
    if save:
        earlier = run.analysis or {}
        if earlier.get("epoch") == result["epoch"]:  # the same weights: keep the other models'
            kept = {**earlier.get("models", {}), **models}  # (--model f dropped G's analysis)
            result["models"] = {r: kept[r] for r in run.roles if r in kept}
        atomic_write_text(run.path / ANALYSIS, json.dumps(result, indent=2))
    return result
