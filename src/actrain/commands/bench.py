"""``actrain bench``: time training steps of actrain's own trainer on synthetic data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actrain.commands import UsageError

ONOFF = {"auto": None, "on": True, "off": False}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time training steps (images/s, breakdown, memory, speed-up over a plain step)",
        description="Times Trainer.train_step on random data of the data set's shape, its"
        " essential passes on their own, and a plain fp32 NCHW step of the same method.",
    )
    p.add_argument("--method", default="act", help="natural, madry, trades or act")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16, help="resnet18 width (64 = full)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="PGD steps K per training step")
    p.add_argument(
        "--train-attack",
        default="pgd",
        help="pgd (K steps), fgsm-rs (one step) or free (Free-AT, --replays updates per step)",
    )
    p.add_argument("--replays", type=int, help="Free-AT's m (4)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--channels-last", choices=tuple(ONOFF), default="auto")
    p.add_argument(
        "--fold-bn",
        choices=tuple(ONOFF),
        default="auto",
        help="fold BN into convs for the eval-mode attack passes (auto: on unless fp32)",
    )
    p.add_argument(
        "--fused-bn",
        choices=tuple(ONOFF),
        default="auto",
        help="actrain's fused CPU kernels (BN + add + ReLU, conv post-ops, weight-gradient"
        " matmuls; auto: on with bf16 on a CPU)",
    )
    p.add_argument(
        "--cuda-graphs",
        choices=tuple(ONOFF),
        default="auto",
        help="replay each update up to its gradients from a CUDA graph (auto: on with CUDA)",
    )
    p.add_argument(
        "--model-streams",
        choices=tuple(ONOFF),
        default="auto",
        help="ACT in the update graph: F's passes on a second CUDA stream (auto: on there)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the models (timed)")
    p.add_argument(
        "--compile-mode",
        help="torch.compile mode with --compile (default, reduce-overhead, max-autotune, ...)",
    )
    p.add_argument("--dataset", default="cifar10", help="shape and augmentation of the data")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's)")
    p.add_argument("--iters", type=int, default=5, help="timed steps (median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reference-iters", type=int, default=2)
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument(
        "--no-flops",
        dest="flops",
        action="store_false",
        help="skip counting the step's FLOPs and timing a matrix product beside it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, robust to other load when --threads 1",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (list for --all)")
    p.add_argument(
        "--all",
        action="store_true",
        help="every method at widths 16 and 64 plus a plain-levers ACT row; writes a table",
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="time PGD-k evaluation (k = --steps) instead of training: fp32 gradients from the"
        " model vs gradients from its BN-folded copy in --precision (auto: fp32), --iters"
        " alternating rounds",
    )
    p.add_argument("--widths", default="16,64", help="widths for --all")
    p.add_argument("--out", default="benchmarks/results.md", help="Markdown table of --all")
    p.set_defaults(func=run)


def _spec(ns: argparse.Namespace):
    from actrain.bench import BenchSpec

    for name in ("batch_size", "iters", "reference_iters"):
        if getattr(ns, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1")
    if ns.steps < 0 or ns.warmup < 0:
        raise UsageError("--steps/--warmup: must be >= 0")
    if ns.width is not None and ns.width < 1:
        raise UsageError(f"--width: must be >= 1, got {ns.width}")
    if ns.threads is not None and ns.threads < 1:
        raise UsageError(f"--threads: must be >= 1, got {ns.threads}")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if ns.compile_mode is not None and ns.compile_mode not in modes:
        raise UsageError(
            f"--compile-mode: expected one of {', '.join(modes)}, got {ns.compile_mode!r}"
        )
    return BenchSpec(
        method=ns.method,
        arch=ns.arch,
        width=ns.width,
        batch_size=ns.batch_size,
        steps=ns.steps,
        train_attack=ns.train_attack,
        replays=ns.replays,
        precision=ns.precision,
        channels_last=ONOFF[ns.channels_last],
        fold_bn=ONOFF[ns.fold_bn],
        fused_bn=ONOFF[ns.fused_bn],
        cuda_graphs=ONOFF[ns.cuda_graphs],
        model_streams=ONOFF[ns.model_streams],
        compile=ns.compile or ns.compile_mode is not None,
        compile_mode=ns.compile_mode,
        flops=ns.flops,
        dataset=ns.dataset,
        device=ns.device,
        threads=ns.threads,
        iters=ns.iters,
        warmup=ns.warmup,
        reference=ns.reference,
        reference_iters=ns.reference_iters,
        seed=ns.seed,
        clock=ns.clock,
    )


def run(ns: argparse.Namespace) -> int:
    from actrain import bench

    spec = _spec(ns)
    spec.train_config()  # validates method, arch, precision, ... before any time is spent
    if ns.eval:
        if ns.all:
            raise UsageError("--eval and --all: choose one")
        if ns.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(
                f"--precision: --eval takes fp32 (auto, the evaluation default) or bf16,"
                f" got {ns.precision!r}"
            )
        result = bench.run_eval_bench(spec)
        print(json.dumps(result) if ns.json else bench.format_eval_line(result))
        return 0
    if not ns.all:
        result = bench.run_bench(spec)
        print(json.dumps(result) if ns.json else bench.format_line(result))
        return 0
    try:
        widths = tuple(int(w) for w in ns.widths.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"--widths: expected integers such as 16,64, got {ns.widths!r}") from None
    if not widths or min(widths) < 1:
        raise UsageError(f"--widths: expected positive integers, got {ns.widths!r}")
    from actrain.outputs import writable_file

    writable_file(ns.out, "--out")  # before the matrix's minutes, not after
    rows = bench.run_all(spec, widths, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = bench.markdown_table(rows)
    out = Path(ns.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    except OSError as exc:
        raise UsageError(f"--out: cannot write {out} ({exc.strerror})") from None
    print(json.dumps(rows) if ns.json else table)
    print(f"table written to {out}", file=sys.stderr)
    return 0
