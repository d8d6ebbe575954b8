"""``actrain analyze``: weight norms, random-label probe and posterior entropy of runs."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from actrain.commands import UsageError

PROBE_EPOCHS = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="model complexity, information compression and entropy (paper Figs. 3 and 4)",
        description=(
            "For every model of each run (G, and F for ACT): the Frobenius norm of each learnable "
            "conv/linear layer, a 400-200 MLP fitted on the frozen penultimate features to fixed "
            "random binary labels of the training set, and the mean softmax entropy over the "
            "training set. Saves RUN/analysis/analysis.json; --out DIR also writes the figures."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or folders of runs)")
    p.add_argument("--model", default="all", help="g, f or all (default: every model of a run)")
    p.add_argument(
        "--max-samples",
        type=int,
        help="class-balanced seeded subset of N training images (default: the whole training set)",
    )
    p.add_argument(
        "--probe-epochs", type=int, default=PROBE_EPOCHS, help=f"MLP epochs ({PROBE_EPOCHS})"
    )
    p.add_argument("--probe-seed", type=int, default=0, help="random labels and MLP seed (0)")
    p.add_argument("--probe-lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    p.add_argument("--probe-batch-size", type=int, default=128)
    p.add_argument(
        "--standardize", action="store_true", help="z-score the features before the probe"
    )
    p.add_argument("--data-dir", help="override the runs' data folder")
    p.add_argument("--batch-size", type=int, default=512, help="inference batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write analysis.md/.html and the figures to this folder")
    p.set_defaults(func=run)


def command_of(ns: argparse.Namespace) -> str:
    argv = ["actrain", "analyze", *ns.runs]
    defaults = {
        "model": "all",
        "probe_epochs": 30,
        "probe_seed": 0,
        "probe_lr": 1e-3,
        "probe_batch_size": 128,
    }
    for k, d in defaults.items():
        if getattr(ns, k) != d:
            argv += ["--" + k.replace("_", "-"), str(getattr(ns, k))]
    if ns.max_samples:
        argv += ["--max-samples", str(ns.max_samples)]
    if ns.standardize:
        argv.append("--standardize")
    if ns.data_dir:
        argv += ["--data-dir", ns.data_dir]
    return shlex.join(argv)


def run(ns: argparse.Namespace) -> int:
    from actrain.analysis.analyze import analyze_run
    from actrain.analysis.runs import expand_run_args
    from actrain.runtime import resolve_device

    if ns.model not in ("g", "f", "all"):
        raise UsageError(f"--model: expected g, f or all, got '{ns.model}'")
    if ns.max_samples is not None and ns.max_samples < 2:
        raise UsageError("--max-samples: must be >= 2")
    if ns.probe_epochs < 1 or ns.probe_batch_size < 1 or ns.batch_size < 1:
        raise UsageError("--probe-epochs/--probe-batch-size/--batch-size: must be >= 1")
    if not ns.probe_lr > 0:
        raise UsageError(f"--probe-lr: must be > 0, got {ns.probe_lr}")
    from actrain.data.registry import check_data_dir

    check_data_dir(ns.data_dir)
    if ns.out:
        from actrain.outputs import writable_dir

        writable_dir(ns.out, "--out")
    device = resolve_device(ns.device)
    runs = expand_run_args(ns.runs)
    command = command_of(ns)
    roles = None if ns.model == "all" else [ns.model]
    for r in runs:  # every refusal before the table starts
        if roles and roles[0] not in r.roles:
            raise UsageError(f"{r.path}: no model '{ns.model}' (this run has {', '.join(r.roles)})")
        if ns.out and Path(ns.out).resolve() == (Path(r.path) / "analysis").resolve():
            raise UsageError(
                f"--out: {ns.out} is the run's own analysis folder, whose analysis.json the"
                " figures' summary would replace; give another folder"
            )
    if ns.out:
        from actrain.report import check_report_folder

        check_report_folder(ns.out, "analysis")  # before the analyses spend their minutes
    print(
        f"{'run':<32} {'model':<5} {'layers':>6} {'sum |W|_F':>10} {'probe acc':>9} {'entropy':>8}"
    )
    for r in runs:
        res = analyze_run(
            r.path,
            roles=roles,
            data_dir=ns.data_dir,
            max_samples=ns.max_samples,
            probe_epochs=ns.probe_epochs,
            probe_seed=ns.probe_seed,
            probe_lr=ns.probe_lr,
            probe_batch_size=ns.probe_batch_size,
            probe_standardize=ns.standardize,
            batch_size=ns.batch_size,
            device=device,
            command=command,
        )
        for role, m in res["models"].items():
            total = sum(x["norm"] for x in m["norms"])
            print(
                f"{r.name[:32]:<32} {role.upper():<5} {len(m['norms']):>6} {total:>10.3f} "
                f"{m['probe']['final_acc']:>8.2f}% {m['entropy']:>8.4f}"
            )
    if ns.out:
        from actrain.analysis.runs import expand_run_args as reload
        from actrain.report import build_report

        files = build_report(
            reload(ns.runs),
            ns.out,
            title="actrain analyses",
            command=command,
            sections=("analyses",),
        )
        print(f"analyses: {files['markdown']} and {files['html']}")
    return 0
