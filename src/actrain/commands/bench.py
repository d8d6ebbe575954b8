"""``actrain bench``: time training steps of actrain's own trainer on synthetic data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actrain.commands import UsageError

ONOFF = {"auto": None, "on": True, "off": False}
WARMUP, REFERENCE_ITERS = 2, 2  # defaults (--eval uses neither: given otherwise, refused)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time training steps (images/s, breakdown, memory, speed-up over a plain step)",
        description="Times Trainer.train_step on random data of the data set's shape, its"
        " essential passes on their own, and a plain fp32 NCHW step of the same method.",
    )
    p.add_argument("--method", help="natural, madry, trades or act (default: act)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument(
        "--width", type=int, help="width of resnet18-like models (default 16; 64 = full)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="PGD steps K per training step")
    p.add_argument(
        "--train-attack",
        default="pgd",
        help="pgd (K steps), fgsm-rs (one step) or free (Free-AT, --replays updates per step)",
    )
    p.add_argument("--replays", type=int, help="Free-AT's m (4)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument(
        "--channels-last",
        choices=tuple(ONOFF),
        default="auto",
        help="channels_last memory format (auto: on in bf16/fp16, and in fp32 on x86 CPUs"
        " without AVX-512)",
    )
    p.add_argument(
        "--fold-bn",
        choices=tuple(ONOFF),
        default="auto",
        help="fold BN into convs for the eval-mode attack passes (auto: as --channels-last)",
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
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--reference-iters", type=int, default=REFERENCE_ITERS)
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
    p.add_argument("--widths", help="widths for --all (default 16,64; none for fixed-size models)")
    p.add_argument("--out", help="Markdown table of --all (default benchmarks/results.md)")
    p.add_argument(
        "--overwrite", action="store_true", help="let --all replace an existing --out file"
    )
    p.set_defaults(func=run)


def _spec(ns: argparse.Namespace):
    from actrain.bench import BenchSpec
    from actrain.config import WIDTH_ARCHES

    for name in ("batch_size", "iters", "reference_iters"):
        if getattr(ns, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1")
    if ns.steps < 0 or ns.warmup < 0:
        raise UsageError("--steps/--warmup: must be >= 0")
    if ns.width is not None and ns.width < 1:
        raise UsageError(f"--width: must be >= 1, got {ns.width}")
    takes_width = ns.arch in WIDTH_ARCHES
    if ns.width is not None and not takes_width:
        raise UsageError(
            f"--width: {ns.arch} has a fixed size (only {', '.join(WIDTH_ARCHES)} take it)"
        )
    if ns.threads is not None and ns.threads < 1:
        raise UsageError(f"--threads: must be >= 1, got {ns.threads}")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if ns.compile_mode is not None and ns.compile_mode not in modes:
        raise UsageError(
            f"--compile-mode: expected one of {', '.join(modes)}, got {ns.compile_mode!r}"
        )
    return BenchSpec(
        method=ns.method or "act",
        arch=ns.arch,
        width=(ns.width or 16) if takes_width else None,
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


def _refuse_ignored(ns: argparse.Namespace) -> None:
    """Flags the chosen mode would not use: one line, not a run that silently ignores them."""
    given = {
        "--out": ns.out is not None,
        "--widths": ns.widths is not None,
        "--overwrite": ns.overwrite,
    }
    if not ns.all:
        for flag, on in given.items():
            if on:
                raise UsageError(f"{flag}: only with --all (the matrix and its table)")
    else:
        for flag, on in (("--width", ns.width is not None), ("--method", ns.method is not None)):
            if on:
                raise UsageError(f"{flag}: --all runs every method at --widths; leave it out")
    if ns.eval:
        unused = {
            "--method": ns.method is not None,
            "--train-attack": ns.train_attack != "pgd",
            "--replays": ns.replays is not None,
            "--fold-bn": ns.fold_bn != "auto",
            "--channels-last": ns.channels_last != "auto",
            "--fused-bn": ns.fused_bn != "auto",
            "--cuda-graphs": ns.cuda_graphs != "auto",
            "--model-streams": ns.model_streams != "auto",
            "--compile": ns.compile or ns.compile_mode is not None,
            "--warmup": ns.warmup != WARMUP,
            "--reference-iters": ns.reference_iters != REFERENCE_ITERS,
            "--no-reference": not ns.reference,
            "--no-flops": not ns.flops,
        }
        for flag, on in unused.items():
            if on:
                raise UsageError(
                    f"{flag}: not used by --eval (it times PGD-k with the model's fp32"
                    " gradients against its BN-folded copy's in --precision)"
                )


def run(ns: argparse.Namespace) -> int:
    from actrain import bench
    from actrain.runtime import refuse_cpu_fp16, resolve_device

    if ns.eval and ns.all:
        raise UsageError("--eval and --all: choose one")
    _refuse_ignored(ns)
    spec = _spec(ns)
    cfg = spec.train_config()  # validates method, arch, precision, ... before any time is spent
    if ns.eval:
        if ns.precision not in ("auto", "fp32", "bf16"):
            raise UsageError(
                f"--precision: --eval takes fp32 (auto, the evaluation default) or bf16,"
                f" got {ns.precision!r}"
            )
        result = bench.run_eval_bench(spec)
        print(json.dumps(result) if ns.json else bench.format_eval_line(result))
        return 0
    refuse_cpu_fp16(spec.precision, resolve_device(cfg.device))
    if not ns.all:
        result = bench.run_bench(spec)
        print(json.dumps(result) if ns.json else bench.format_line(result))
        return 0
    widths: tuple[int | None, ...] = (None,)  # a fixed-size model: one "width"
    if spec.width is None and ns.widths is not None:
        raise UsageError(f"--widths: {ns.arch} has a fixed size")
    if spec.width is not None:
        text = ns.widths or "16,64"
        try:
            widths = tuple(int(w) for w in text.replace(",", " ").split())
        except ValueError:
            raise UsageError(f"--widths: expected integers such as 16,64, got {text!r}") from None
        if not widths or min(widths) < 1:
            raise UsageError(f"--widths: expected positive integers, got {text!r}")
    from actrain.outputs import writable_file

    out = Path(ns.out or "benchmarks/results.md")
    writable_file(out, "--out")  # before the matrix's minutes, not after
    if out.is_file() and not ns.overwrite:
        raise UsageError(f"--out: {out} exists; pass --overwrite to replace it, or another --out")
    rows = bench.run_all(spec, widths, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = bench.markdown_table(rows)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    except OSError as exc:
        raise UsageError(f"--out: cannot write {out} ({exc.strerror})") from None
    print(json.dumps(rows) if ns.json else table)
    print(f"table written to {out}", file=sys.stderr)
    return 0
