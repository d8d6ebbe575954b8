"""``actrain train``: flags and YAML config, fresh runs and resumes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from actrain.commands import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (ACT, Madry, TRADES or natural)",
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
    g.add_argument(
        "--attack-kl-reduction", help="ACT attack KL: sum (released code) or mean (Eq. 1)"
    )
    g.add_argument("--attack-start", help="auto, gaussian, uniform or zero")
    g.add_argument("--eps", help="L-inf radius, number or fraction such as 8/255 (0.031)")
    g.add_argument(
        "--step-size",
        help="training attack step (PGD 0.007; FGSM-RS 1.25 x eps; Free-AT eps)",
    )
    g.add_argument("--steps", type=int, help="PGD steps in training (10)")
    g = p.add_argument_group("fast adversarial training (docs/fast_training.md)")
    g.add_argument(
        "--train-attack",
        help="attack of madry/trades/act: pgd (K steps, default), fgsm-rs (one step from a"
        " random start) or free (Free-AT: --replays updates per mini-batch, epochs / m)",
    )
    g.add_argument("--replays", type=int, help="Free-AT: replays m of each mini-batch (4)")
    g.add_argument(
        "--overfit-guard",
        action=argparse.BooleanOptionalAction,
        help="stop when PGD accuracy on a held-out batch collapses; keep the best weights"
        " (default: on with fgsm-rs)",
    )
    g.add_argument(
        "--overfit-guard-threshold", type=float, help="drop in points that stops the run (20)"
    )
    g.add_argument("--overfit-guard-size", type=int, help="held-out images it attacks (256)")
    g.add_argument("--overfit-guard-steps", type=int, help="its PGD steps (10)")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10, cifar100, imagefolder")
    g.add_argument("--data-dir", help="local data folder (else downloaded when online)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download")
    g.add_argument("--arch", help="resnet18, preact_resnet18, wideresnet, wrn-28-10, resnet50 ...")
    g.add_argument(
        "--width",
        type=int,
        help="base channels of resnet18 / preact_resnet18 (64; 16 = 1/4) and small_cnn (32)",
    )
    g.add_argument("--arch-f", help="ACT: architecture of the natural model F (default: as G)")
    g.add_argument(
        "--width-f", type=int, help="ACT: width of F (default: --width, also for another --arch-f)"
    )
    g.add_argument("--depth", type=int, help="WideResNet depth")
    g.add_argument("--widen-factor", type=int, help="WideResNet widen factor")
    g.add_argument("--train-subset", type=int, help="train on a class-balanced subset of N")
    g.add_argument("--test-subset", type=int, help="use a class-balanced subset of N test images")
    g.add_argument("--val-size", type=int, help="hold out N training images for validation")
    g.add_argument("--num-workers", type=int, help="DataLoader workers for image folders")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process (128); global = this x processes")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float, help="5e-4 (TRADES: 2e-4)")
    g.add_argument(
        "--milestones",
        nargs="*",
        help="epochs where lr is multiplied by --gamma (default: 30/60/75 %% of the epochs;"
        " the flag with no value: a constant lr)",
    )
    g.add_argument("--gamma", type=float, help="lr decay factor (0.2)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("evaluation during training")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (0 = never)")
    g.add_argument("--eval-size", type=int, help="validation/test images per evaluation (500)")
    g.add_argument("--eval-steps", type=int, help="PGD steps of that evaluation (10)")
    g.add_argument(
        "--eval-step-size",
        help="PGD step of that evaluation (as --step-size; 2.5 eps / --eval-steps with"
        " fgsm-rs and free)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--precision", help="auto, fp32, bf16, fp16")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last memory format (default: on in bf16/fp16, and in fp32 on x86 CPUs"
        " without AVX-512, where it pays)",
    )
    g.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        help="attack passes on a copy of G with batch norm folded into its convs (default: as"
        " --channels-last)",
    )
    g.add_argument(
        "--fused-bn",
        action=argparse.BooleanOptionalAction,
        help="actrain's fused CPU kernels for bf16 (batch norm + add + ReLU, conv post-ops,"
        " weight-gradient matmuls; default: on for bf16 channels_last on a CPU)",
    )
    g.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="replay each update up to its gradients from a CUDA graph (default: on with CUDA,"
        " one process)",
    )
    g.add_argument(
        "--model-streams",
        action=argparse.BooleanOptionalAction,
        help="ACT in the update graph: F's passes on a second CUDA stream, beside G's"
        " (default: on there)",
    )
    g.add_argument(
        "--out", help="run folder (default runs/<method>-<dataset>-<arch>[-w<width>]-s<seed>)"
    )
    g.add_argument("--resume", nargs="?", const=True, help="continue the run in --out (or RUN)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (0)")
    g.add_argument("--nan-policy", help="stop (default) or skip batches with a non-finite loss")
    g.add_argument("--deterministic", action="store_true", help="bitwise-reproducible resume")
    g = p.add_argument_group("several processes (torchrun -m actrain train ...)")
    g.add_argument(
        "--sync-bn", action="store_true", help="batch-norm statistics over the global batch"
    )
    g.add_argument(
        "--scale-lr", action="store_true", help="multiply --lr by the number of processes"
    )
    g.add_argument("--dist-backend", help="auto (nccl on CUDA, gloo on CPU), nccl or gloo")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from actrain.config import build_config, load_yaml, resume_config

    given: dict[str, Any] = {
        k: v for k, v in vars(ns).items() if k not in ("command", "version", "func", "argv")
    }
    config_path = given.pop("config", None)
    resume = given.pop("resume", None)
    overwrite = given.pop("overwrite", False)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite cannot be combined")
    file_values = load_yaml(config_path) if config_path else {}
    if resume:
        run_dir = Path(
            resume if isinstance(resume, str) else given.get("out") or file_values.get("out") or ""
        )
        if not str(run_dir) or str(run_dir) == ".":
            raise UsageError("--resume: name the run folder (--resume RUN or --out RUN)")
        overrides = {**file_values, **given}
        cfg = resume_config(run_dir, overrides)
    else:
        cfg = build_config(file_values, given)
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and cfg.out:
            # torchrun --max-restarts restarted this job: continue its own run folder.
            from actrain.distributed import restart_plan

            plan = restart_plan(Path(cfg.out))
            if plan == "resume":
                resume = True
                cfg = resume_config(Path(cfg.out), {**file_values, **given})
            elif plan == "overwrite":
                overwrite = True
    from actrain.runtime import refuse_cpu_fp16, resolve_device  # torch: the input is valid

    refuse_cpu_fp16(cfg.precision, resolve_device(cfg.device))
    from actrain.train import run_training

    run_training(cfg, resume=bool(resume), overwrite=overwrite)
    return 0
