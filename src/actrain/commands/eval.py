"""``actrain eval``: clean and PGD robust accuracy of a run folder or weights file."""

from __future__ import annotations

import argparse
import json

from actrain.commands import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="clean and PGD accuracy of a run folder or weights file")
    p.add_argument("run", help="run folder or .safetensors file")
    p.add_argument("--attack", default="pgd", help="pgd")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--step-size", default="0.003")
    p.add_argument("--loss", default="ce", help="ce or margin")
    p.add_argument("--test-subset", type=int, help="class-balanced, seeded subset of N test images")
    p.add_argument("--dataset", help="override the run's dataset")
    p.add_argument("--data-dir", help="override the run's data folder")
    p.add_argument("--model", default="g", help="which model of the run: g (robust) or f (ACT)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", help="fp32 (default: full-strength attack)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from actrain.config import parse_fraction
    from actrain.evaluate import evaluate_run, write_json

    eps = parse_fraction(ns.eps, "--eps")
    step = parse_fraction(ns.step_size, "--step-size")
    if not 0 <= eps <= 1 or not 0 <= step <= 1:
        raise UsageError("--eps/--step-size: must be in [0, 1]")
    if ns.steps < 0 or ns.restarts < 1:
        raise UsageError("--steps must be >= 0 and --restarts >= 1")
    if ns.loss not in ("ce", "margin"):
        raise UsageError(f"--loss: unknown loss '{ns.loss}' (choices: ce, margin)")
    result = evaluate_run(
        ns.run,
        attack=ns.attack,
        steps=ns.steps,
        restarts=ns.restarts,
        eps=eps,
        step_size=step,
        loss=ns.loss,
        test_subset=ns.test_subset,
        dataset=ns.dataset,
        data_dir=ns.data_dir,
        batch_size=ns.batch_size,
        device=ns.device,
        precision=ns.precision,
        role=ns.model,
        seed=ns.seed,
        progress=ns.progress,
    )
    print(
        f"{result['run']} [{result['model'].upper()}]  clean {result['clean_acc']:.2f}%  "
        f"PGD-{ns.steps}x{ns.restarts} (eps {eps:.4f}) {result['robust_acc']:.2f}%  "
        f"on {result['n']} test images"
    )
    if ns.json:
        write_json(result, ns.json)
    else:
        print(json.dumps({k: result[k] for k in ("clean_acc", "robust_acc", "n")}))
    return 0
