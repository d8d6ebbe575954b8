"""``make demo``: train ACT and Madry on scikit-learn's bundled digits and compare them.

Runs offline in a couple of minutes on 2 CPU cores. Both models are small CNNs trained with the
same attack (eps 0.1, 10 PGD steps); both are then evaluated with PGD-20 x 5 restarts.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from actrain.checkpoint import load_model
from actrain.config import build_config, load_yaml
from actrain.data import load_split
from actrain.evaluate import robust_accuracy
from actrain.train import run_training

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quickstart"


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path("runs") / f"demo-{stamp}"
    results = {}
    t_start = time.perf_counter()
    for method in ("act", "madry"):
        file_values = load_yaml(CONFIGS / f"digits_{method}.yaml")
        cfg = build_config(file_values, {"out": str(root / method), "progress": False})
        print(
            f"== training {method.upper()} ({cfg.epochs} epochs, eps {cfg.eps}) -> {cfg.out}",
            flush=True,
        )
        run_dir = run_training(cfg)
        results[method] = run_dir
    test = load_split("digits", "test")
    x = test.images.float().div(255)
    rows = []
    for method, run_dir in results.items():
        roles = ("g", "f") if method == "act" else ("g",)
        for role in roles:
            model = load_model(run_dir, role=role)
            r = robust_accuracy(
                model, x, test.labels, eps=0.1, step_size=0.01, steps=20, restarts=5
            )
            label = {"g": "robust model G", "f": "natural model F"}[role]
            name = f"{method.upper()} ({label})" if method == "act" else "Madry"
            rows.append((name, r["clean_acc"], r["robust_acc"]))
    print(
        f"\nDigits test set ({len(test.labels)} images), PGD-20 x 5 restarts, eps 0.1, step 0.01:"
    )
    print(f"{'model':<26}{'clean acc':>10}{'robust acc':>12}")
    for name, clean, rob in rows:
        print(f"{name:<26}{clean:>9.1f}%{rob:>11.1f}%")
    print(f"\n(runs in {root}; {time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
