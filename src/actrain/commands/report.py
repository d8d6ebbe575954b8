"""``actrain report``: Markdown + self-contained HTML report over runs, seeds as repeats."""

from __future__ import annotations

import argparse
import shlex

from actrain.commands.analyze import PROBE_EPOCHS  # the analyses --analyze makes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="report.md + report.html with curves, tables (mean ± std over seeds) and analyses",
        description=(
            "Group runs by configuration (seeds as repeats) and write DIR/report.md, a "
            "self-contained DIR/report.html (figures embedded), DIR/report.json and the PNGs. "
            "RUN may be a run folder, a sweep folder or a folder of runs."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--title", default="actrain report")
    p.add_argument(
        "--analyze",
        action="store_true",
        help="run `actrain analyze` (default settings) on runs that have no analysis yet",
    )
    p.add_argument("--max-samples", type=int, help="with --analyze: training images per analysis")
    p.add_argument(
        "--probe-epochs", type=int, default=PROBE_EPOCHS, help="with --analyze: MLP epochs"
    )
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from actrain.analysis.runs import expand_run_args
    from actrain.errors import UsageError
    from actrain.report import build_report, check_report_folder

    if not ns.analyze:
        for flag, given in (("--max-samples", ns.max_samples is not None),
                            ("--probe-epochs", ns.probe_epochs != PROBE_EPOCHS)):  # fmt: skip
            if given:
                raise UsageError(f"{flag}: only with --analyze (it sets how analyses are made)")
    if ns.max_samples is not None and ns.max_samples < 2:
        raise UsageError("--max-samples: must be >= 2")
    if ns.probe_epochs < 1:
        raise UsageError(f"--probe-epochs: must be >= 1, got {ns.probe_epochs}")
    from actrain.outputs import writable_dir

    writable_dir(ns.out, "--out")
    check_report_folder(ns.out, "report")  # before --analyze spends its minutes
    argv = ["actrain", "report", *ns.runs, "--out", ns.out]
    if ns.title != "actrain report":
        argv += ["--title", ns.title]
    runs = expand_run_args(ns.runs)
    if ns.analyze:
        from actrain.analysis.analyze import analyze_run
        from actrain.runtime import resolve_device

        argv.append("--analyze")
        acmd = ["actrain", "analyze"]
        if ns.max_samples:
            argv += ["--max-samples", str(ns.max_samples)]
            acmd_extra = ["--max-samples", str(ns.max_samples)]
        else:
            acmd_extra = []
        if ns.probe_epochs != PROBE_EPOCHS:
            argv += ["--probe-epochs", str(ns.probe_epochs)]
            acmd_extra += ["--probe-epochs", str(ns.probe_epochs)]
        for r in runs:
            if (
                r.analysis is None
                or r.analysis_stale
                or set(r.analysis.get("models", {})) != set(r.roles)
            ):
                print(f"analyzing {r.path} ...")
                cmd = shlex.join([*acmd, str(r.path), *acmd_extra])
                analyze_run(
                    r.path,
                    device=resolve_device("auto"),
                    max_samples=ns.max_samples,
                    probe_epochs=ns.probe_epochs,
                    command=cmd,
                )
        runs = expand_run_args(ns.runs)
    files = build_report(runs, ns.out, title=ns.title, command=shlex.join(argv))
    print(f"report: {files['markdown']}  {files['html']}  ({len(files['figures'])} figures)")
    if files["removed"]:
        print(
            f"removed the earlier report's figures it no longer has: {', '.join(files['removed'])}"
        )
    return 0
