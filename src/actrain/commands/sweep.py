"""``actrain sweep``: one training run per value of a parameter, e.g. ACT's alpha (Table 1)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from actrain.commands import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train one run per value of a parameter (alpha, beta, eps, seed ...)",
        description=(
            "Launch `actrain train --config FILE --PARAM VALUE --out OUT/PARAM-VALUE` for every "
            "value, N processes at a time. OUT/sweep.json lists the runs; run the same command "
            "again to finish an interrupted sweep. `actrain report OUT` tabulates it (Table 1)."
        ),
    )
    p.add_argument(
        "--param",
        nargs="+",
        required=True,
        metavar="NAME VALUE",
        help="the training option and its values, e.g. --param alpha 0.1 0.5 0.9",
    )
    p.add_argument("--config", help="YAML config shared by every run")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="extra training option for every run (repeatable), e.g. --set epochs=5",
    )
    p.add_argument("--out", help="sweep folder (default sweeps/<config>-<param>)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from actrain.outputs import writable_dir
    from actrain.sweep import param_key, parse_sets, plan_sweep, run_sweep

    if len(ns.param) < 2:
        raise UsageError("--param: give the parameter name and at least one value")
    param, values = ns.param[0], ns.param[1:]
    key = param_key(param)
    sets = parse_sets(ns.set)
    stem = Path(ns.config).stem if ns.config else "sweep"
    out = Path(ns.out) if ns.out else Path("sweeps") / f"{stem}-{key}"
    plan = plan_sweep(param, values, config=ns.config, out_dir=out, sets=sets)
    writable_dir(out, "--out")
    argv = ["actrain", "sweep", "--param", key, *values]
    if ns.config:
        argv += ["--config", ns.config]
    for s in ns.set or []:
        argv += ["--set", s]
    argv += ["--out", str(out), "--jobs", str(ns.jobs)]
    command = shlex.join(argv)
    if ns.dry_run:
        for p in plan:
            print(shlex.join(p["argv"]))
        return 0
    doc = run_sweep(
        plan, out_dir=out, param=key, config=ns.config, sets=sets, jobs=ns.jobs, command=command
    )
    _print_summary(doc)
    failed = [r for r in doc["runs"] if r["status"] != "finished"]
    print(f"sweep: {len(doc['runs']) - len(failed)}/{len(doc['runs'])} runs finished -> {out}")
    print(f"report: actrain report {out} --out {out / 'report'}")
    return 1 if failed else 0


def _print_summary(doc: dict) -> None:
    from actrain.analysis.runs import load_run
    from actrain.report import metric_scores

    rows = []
    for r in doc["runs"]:
        if r["status"] != "finished":
            rows.append(f"  {doc['param']}={r['value']:<8} {r['status']}")
            continue
        run = load_run(r["out"])
        parts = []
        for role in run.roles:
            s = metric_scores(run, role)
            parts += [f"{role.upper()} {k} {v:.2f}" for k, v in s.items()]
        rows.append(f"  {doc['param']}={r['value']:<8} " + "  ".join(parts))
    print("\n".join(rows))
