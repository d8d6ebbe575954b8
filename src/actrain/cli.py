"""Command line: ``actrain train`` and ``actrain eval``.

User mistakes (bad flags, missing folders, broken files) print one line naming the problem
and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (ACT, Madry, TRADES or natural)",
        description="Train with flags and/or a YAML config (flags override the file).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file with option: value lines (keys as the flags)")
    g = p.add_argument_group("method")
    g.add_argument("--method", help="natural, madry, trades or act (default act)")
    g.add_argument("--alpha", type=float, help="ACT balance between CE and mimicry KL (0.9)")
    g.add_argument("--beta", type=float, help="TRADES robustness weight 1/lambda (5)")
    g.add_argument("--temperature", type=float, help="ACT mimicry softmax temperature (4)")
    g.add_argument("--attack-temperature", type=float, help="ACT attack KL temperature (1)")
    g.add_argument("--attack-kl-reduction", help="ACT attack KL: sum (released code) or mean (Eq. 1)")
    g.add_argument("--attack-start", help="auto, gaussian, uniform or zero")
    g.add_argument("--eps", help="L-inf radius, number or fraction such as 8/255 (0.031)")
    g.add_argument("--step-size", help="PGD step in training (0.007)")
    g.add_argument("--steps", type=int, help="PGD steps in training (10)")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10, cifar100, imagefolder")
    g.add_argument("--data-dir", help="local data folder (else downloaded when online)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download")
    g.add_argument("--arch", help="resnet18, preact_resnet18, wideresnet, wrn-28-10, resnet50 ...")
    g.add_argument("--width", type=int, help="base channels of the CIFAR ResNets (64; 16 = 1/4)")
    g.add_argument("--arch-f", help="ACT: architecture of the natural model F (default: as G)")
    g.add_argument("--width-f", type=int, help="ACT: width of F")
    g.add_argument("--depth", type=int, help="WideResNet depth")
    g.add_argument("--widen-factor", type=int, help="WideResNet widen factor")
    g.add_argument("--train-subset", type=int, help="train on a class-balanced subset of N")
    g.add_argument("--test-subset", type=int, help="use a class-balanced subset of N test images")
    g.add_argument("--val-size", type=int, help="hold out N training images for validation")
    g.add_argument("--num-workers", type=int, help="DataLoader workers for image folders")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process (128)")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float, help="5e-4 (TRADES: 2e-4)")
    g.add_argument("--milestones", nargs="+", help="epochs where lr is multiplied by --gamma")
    g.add_argument("--gamma", type=float, help="lr decay factor (0.2)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (0 = never)")
    g.add_argument("--eval-size", type=int, help="validation/test images per evaluation (500)")
    g.add_argument("--eval-steps", type=int, help="PGD steps of that evaluation (10)")
    g.add_argument("--eval-step-size", help="PGD step of that evaluation (as --step-size)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--precision", help="auto, fp32, bf16, fp16")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    g.add_argument("--out", help="run folder (default runs/<method>-<dataset>-<arch>-s<seed>)")
    g.add_argument("--resume", nargs="?", const=True, help="continue the run in --out (or RUN)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actrain", description="Adversarial Concurrent Training and its baselines."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub)
    _eval_parser(sub)
    return parser


def cmd_train(ns: argparse.Namespace) -> int:
    from actrain.config import build_config, load_yaml
    from actrain.train import resume_config, run_training

    given: dict[str, Any] = {
        k: v for k, v in vars(ns).items() if k not in ("command", "version")
    }
    config_path = given.pop("config", None)
    resume = given.pop("resume", None)
    overwrite = given.pop("overwrite", False)
    if resume and overwrite:
        raise _usage("--resume and --overwrite cannot be combined")
    file_values = load_yaml(config_path) if config_path else {}
    if resume:
        run_dir = Path(resume if isinstance(resume, str) else given.get("out") or file_values.get("out") or "")
        if not str(run_dir) or str(run_dir) == ".":
            raise _usage("--resume: name the run folder (--resume RUN or --out RUN)")
        overrides = {**file_values, **given}
        cfg = resume_config(run_dir, overrides)
        run_training(cfg, resume=True)
    else:
        cfg = build_config(file_values, given)
        run_training(cfg, overwrite=overwrite)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from actrain.config import parse_fraction
    from actrain.evaluate import evaluate_run, write_json

    eps = parse_fraction(ns.eps, "--eps")
    step = parse_fraction(ns.step_size, "--step-size")
    if not 0 <= eps <= 1 or not 0 <= step <= 1:
        raise _usage("--eps/--step-size: must be in [0, 1]")
    if ns.steps < 0 or ns.restarts < 1:
        raise _usage("--steps must be >= 0 and --restarts >= 1")
    if ns.loss not in ("ce", "margin"):
        raise _usage(f"--loss: unknown loss '{ns.loss}' (choices: ce, margin)")
    result = evaluate_run(
        ns.run, attack=ns.attack, steps=ns.steps, restarts=ns.restarts, eps=eps, step_size=step,
        loss=ns.loss, test_subset=ns.test_subset, dataset=ns.dataset, data_dir=ns.data_dir,
        batch_size=ns.batch_size, device=ns.device, precision=ns.precision, role=ns.model,
        seed=ns.seed, progress=ns.progress,
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


class UsageError(ValueError):
    pass


def _usage(msg: str) -> UsageError:
    return UsageError(msg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "version", False):
        from actrain import __version__

        print(__version__)
        return 0
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    from actrain.checkpoint import CheckpointError
    from actrain.config import ConfigError
    from actrain.data import DataError
    from actrain.models import UnknownModelError

    try:
        return {"train": cmd_train, "eval": cmd_eval}[ns.command](ns)
    except (ConfigError, DataError, CheckpointError, UnknownModelError, UsageError) as exc:
        msg = str(exc).strip("'\"")
        print(f"actrain {ns.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"actrain {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
