"""``actrain eval``: robustness of run folders or weights files, from one PGD number to the
ACT paper's full suite (``--suite paper``), black-box transfer tables and sanity checks."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from actrain.commands import UsageError
from actrain.outputs import writable_dir, writable_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="robustness of run folders: PGD, AutoAttack, min. perturbation, eps sweep, transfer",
        description=(
            "Evaluate one or more run folders or .safetensors files. Several runs of one "
            "configuration are reported as mean ± std. --suite paper writes the rows of the ACT "
            "paper's Tables 2 and 5, AutoAttack and the gradient-masking checks; --transfer "
            "SURROGATE TARGET... writes Table 3."
        ),
    )
    p.add_argument("run", nargs="+", help="run folder(s) or .safetensors file(s)")
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--suite",
        choices=("basic", "paper"),
        default="basic",
        help="basic: one attack (--attack); paper: every protocol of the paper",
    )
    g.add_argument("--attack", default="pgd", help="pgd, fgsm or autoattack (basic suite)")
    g.add_argument(
        "--sanity",
        action="store_true",
        help="gradient-masking checks (PGD-k, eps sweep, Square, AutoAttack)",
    )
    g.add_argument(
        "--transfer",
        action="store_true",
        help="black-box transfer: the first run is the surrogate, the rest targets",
    )
    g.add_argument(
        "--transfer-matrix",
        action="store_true",
        help="every run as surrogate and as target (full Table 3)",
    )
    g.add_argument(
        "--no-autoattack",
        dest="autoattack",
        action="store_false",
        help="leave AutoAttack out of --suite paper / --sanity",
    )
    g.add_argument(
        "--surrogate",
        action="append",
        default=[],
        help="run folder whose PGD-20 examples are a black-box baseline (repeatable)",
    )
    a = p.add_argument_group("attack settings")
    a.add_argument(
        "--eps", help="L-inf radius, e.g. 8/255 (default: the run's training eps, else 8/255)"
    )
    a.add_argument(
        "--step-size",
        help="PGD step (default: the paper's 0.003, or 2.5 eps / k where k steps of 0.003"
        " cannot reach the ball's surface, e.g. eps 0.1 with PGD-20)",
    )
    a.add_argument("--steps", type=int, default=20, help="PGD steps (basic suite)")
    a.add_argument("--pgd-steps", default="20,100,1000", help="PGD-k list (paper suite)")
    a.add_argument("--restarts", type=int, default=5)
    a.add_argument("--loss", default="ce", help="ce or margin")
    a.add_argument(
        "--targeted",
        type=int,
        default=0,
        help="multi-targeted PGD over the N most likely wrong classes (0: untargeted)",
    )
    a.add_argument(
        "--eps-sweep",
        default=",".join(map(str, (1, 5, 10, 15, 20, 25, 50, 100))),
        help="eps values in units of 1/255 for the sweep",
    )
    a.add_argument("--sweep-steps", type=int, default=100)
    a.add_argument(
        "--min-pert",
        default="fgsm-k,pgd-search",
        help="minimum-perturbation methods: fgsm-k, pgd-search",
    )
    a.add_argument("--min-pert-search-steps", type=int, default=10)
    a.add_argument(
        "--square-queries",
        type=int,
        default=1000,
        help="queries of the stand-alone Square black-box baseline (0: skip)",
    )
    d = p.add_argument_group("data and output")
    d.add_argument("--test-subset", type=int, help="class-balanced, seeded subset of N test images")
    d.add_argument("--dataset", help="override the run's dataset")
    d.add_argument("--data-dir", help="override the run's data folder")
    d.add_argument(
        "--model",
        choices=("g", "f"),
        default=None,
        help="which model of a run folder: g (robust, default) or f (ACT's natural model);"
        " a weights file holds one model, named in the file",
    )
    d.add_argument("--batch-size", type=int, default=256)
    d.add_argument("--device", default="auto")
    d.add_argument(
        "--precision",
        default="fp32",
        help="the attacks' gradients: fp32 (default) or bf16; verdicts are always fp32",
    )
    d.add_argument(
        "--fold-bn",
        choices=("auto", "on", "off"),
        default="auto",
        help="PGD gradients from the model with BN folded into the convs, channels_last;"
        " verdicts always from the model itself (auto: on for CPUs and CUDA GPUs)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", help="write the result to this JSON file")
    d.add_argument("--markdown", help="write the Markdown tables to this file")
    d.add_argument("--out", help="folder for eval.json, eval.md (and examples.png)")
    d.add_argument(
        "--save-examples",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="PNG grid of minimal adversarial examples (Fig. 2); without PNG: examples.png in"
        " --out, else in the current folder (never over an existing one)",
    )
    d.add_argument("--num-examples", type=int, default=8)
    d.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got '{text}'") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag}: expected positive integers, got '{text}'")
    return vals


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got '{text}'") from None
    if not vals or any(v < 0 for v in vals):
        raise UsageError(f"{flag}: expected non-negative numbers, got '{text}'")
    return vals


def _default_eps(path: str) -> float:
    from actrain.config import parse_fraction
    from actrain.evaluation.suite import eval_config

    cfg_eps = eval_config(path).get("eps")
    if cfg_eps is not None:
        return parse_fraction(cfg_eps, "eps")
    return 8 / 255


def _check_image(path: Path) -> None:
    suffix = path.suffix.lower().lstrip(".")
    if suffix:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            raise UsageError(
                f"--save-examples: {path}: cannot write .{suffix} images (use .png, .pdf or .svg)"
            )
    writable_file(path, "--save-examples")


def _example_paths(ns: argparse.Namespace, out_dir: Path | None) -> list[str | None]:
    """Where each run's Fig. 2 grid goes (None: no grid). A PNG the user named is theirs to
    overwrite; the default name is never written over an existing file outside --out."""
    if ns.save_examples is None or ns.transfer or ns.transfer_matrix:
        return [None] * len(ns.run)
    png = Path(ns.save_examples) if ns.save_examples else (out_dir or Path(".")) / "examples.png"
    paths = [png] if len(ns.run) == 1 else [
        png.with_stem(f"{png.stem}_{i}") for i in range(len(ns.run))
    ]  # fmt: skip
    for p in paths:
        _check_image(p)
        if not ns.save_examples and out_dir is None and p.exists():
            raise UsageError(
                f"--save-examples: {p} exists; name the file (--save-examples PNG) or give"
                " --out DIR, so that it is not overwritten"
            )
    return [str(p) for p in paths]


def _check_outputs(
    ns: argparse.Namespace, out_dir: Path | None, json_path: str | None, md_path: str | None
) -> None:
    """Every file eval will write, checked before any evaluation work."""
    if out_dir is not None:
        writable_dir(out_dir, "--out")
    if json_path:
        writable_file(json_path, "--json" if ns.json else "--out")
    if md_path:
        writable_file(md_path, "--markdown" if ns.markdown else "--out")


def _input_files(paths: list[str]) -> dict[Path, str]:
    """The files an evaluation reads or that hold a run's training: each weights file given,
    and the config, checkpoint, final weights and metrics of each run folder (also of the
    folder a given file sits in). Resolved path -> the run it belongs to."""
    from actrain.checkpoint import RUN_FILES

    files: dict[Path, str] = {}
    for given in paths:
        p = Path(given)
        if p.is_file():
            files[p.resolve()] = given
            p = p.parent if (p.parent / "config.json").is_file() else p
        if p.is_dir():
            for pattern in (*RUN_FILES, "*.safetensors"):  # and a weights file of any name
                files.update({f.resolve(): given for f in p.glob(pattern) if f.is_file()})
    return files


def _refuse_inputs(ns: argparse.Namespace, outputs: list[tuple[str, str | None]]) -> None:
    """An output path that names a run's own file (``--json RUN/model_g.safetensors``) wrote
    the results over the trained model or its config: refused before any work."""
    inputs = _input_files([*ns.run, *ns.surrogate])
    for flag, path in outputs:
        run = inputs.get(Path(path).resolve()) if path else None
        if run is not None:
            raise UsageError(
                f"{flag}: {path} is a file of {run} (its model, checkpoint, config or"
                " metrics); results never replace it, give another file"
            )


def _preflight(ns: argparse.Namespace, eps_given: bool) -> list[dict[str, Any]]:
    """Each run's model, role, data set and surrogates checked before any attack runs (a
    mistake in the last run is found before the first is evaluated). Returns the configs."""
    from actrain.config import parse_fraction
    from actrain.evaluation.suite import check_run, check_surrogate

    configs = []
    for path in ns.run:
        _, cfg, name, _ = check_run(path, role=ns.model, dataset=ns.dataset)
        configs.append(cfg)
        if not (ns.transfer or ns.transfer_matrix):
            for sp in ns.surrogate:
                check_surrogate(sp, target=path, target_dataset=name, dataset=ns.dataset)
    if not eps_given and len(configs) > 1:
        # the default eps is a run's training eps: refuse to attack the others at another one.
        # Transfer attacks at the targets' eps; a naturally trained run was attacked at none.
        pairs = list(zip(ns.run, configs, strict=True))
        if ns.transfer:
            pairs = pairs[1:]
        adversarial = [(p, c) for p, c in pairs if c.get("method") != "natural"]
        pairs = adversarial or pairs
        trained = [
            (p, None if c.get("eps") is None else parse_fraction(c["eps"], "eps")) for p, c in pairs
        ]
        known = {e for _, e in trained if e is not None}
        if len(known) > 1 or (trained[0][1] is None and known):
            each = ", ".join(f"{'unknown' if e is None else f'{e:g}'} ({p})" for p, e in trained)
            raise UsageError(
                f"--eps: the runs were trained at different eps ({each}); pass --eps so that"
                " all are attacked at the same one"
            )
        ns.eps_from = trained[0][0]
    return configs


def _refuse_repeats(paths: list[str], model: str | None) -> None:
    from actrain.evaluation.suite import run_identity

    seen: dict[tuple[str, str], str] = {}
    for path in paths:
        key = run_identity(path, model)
        if key in seen:
            same = "given twice" if seen[key] == path else f"and {seen[key]} are one model"
            raise UsageError(
                f"run given more than once: {path} {same} ({key[1].upper()} of {key[0]})"
            )
        seen[key] = path


def run(ns: argparse.Namespace) -> int:
    # ---- issue 5: under torchrun, PGD batches are split over processes; rank 0 reports ----
    from actrain.distributed import env_info, eval_setup

    ns = eval_setup(ns)
    # ---- end issue 5 ----
    from actrain.config import parse_fraction
    from actrain.evaluation import aggregate, markdown, table3
    from actrain.evaluation.report import group_label, group_results
    from actrain.evaluation.sanity import format_checks
    from actrain.evaluation.suite import evaluate_run, transfer_matrix
    from actrain.runtime import refuse_cpu_fp16, resolve_device, slow_bf16_note

    step = None if ns.step_size is None else parse_fraction(ns.step_size, "--step-size")
    if ns.eps is not None:
        eps = parse_fraction(ns.eps, "--eps")
        if not 0 <= eps <= 1:
            raise UsageError("--eps/--step-size: must be in [0, 1]")
    if step is not None and not 0 <= step <= 1:
        raise UsageError("--eps/--step-size: must be in [0, 1]")
    if ns.steps < 0 or ns.restarts < 1:
        raise UsageError("--steps must be >= 0 and --restarts >= 1")
    if ns.loss not in ("ce", "margin"):
        raise UsageError(f"--loss: unknown loss '{ns.loss}' (choices: ce, margin)")
    if ns.attack not in ("pgd", "fgsm", "autoattack"):
        raise UsageError(f"--attack: unknown attack '{ns.attack}' (choices: pgd, fgsm, autoattack)")
    if ns.targeted < 0:
        raise UsageError("--targeted: must be >= 0")
    min_pert = tuple(m.strip() for m in ns.min_pert.split(",") if m.strip())
    if not min_pert or any(m not in ("fgsm-k", "pgd-search") for m in min_pert):
        raise UsageError(f"--min-pert: expected fgsm-k and/or pgd-search, got '{ns.min_pert}'")
    if ns.save_examples is not None and (ns.transfer or ns.transfer_matrix):
        raise UsageError("--save-examples: not with --transfer/--transfer-matrix (Table 3 only)")
    if ns.transfer and len(ns.run) < 2:
        raise UsageError("--transfer: give SURROGATE TARGET [TARGET...]")
    pgd_steps = _ints(ns.pgd_steps, "--pgd-steps")
    eps_sweep = _floats(ns.eps_sweep, "--eps-sweep")
    if max(eps_sweep) > 255:
        raise UsageError(
            f"--eps-sweep: values are in units of 1/255, so at most 255; got '{ns.eps_sweep}'"
        )
    from actrain.data.registry import check_data_dir

    check_data_dir(ns.data_dir, ns.dataset)
    out_dir = Path(ns.out) if ns.out else None
    json_path = ns.json or (str(out_dir / "eval.json") if out_dir else None)
    md_path = ns.markdown or (str(out_dir / "eval.md") if out_dir else None)
    _check_outputs(ns, out_dir, json_path, md_path)
    pngs = _example_paths(ns, out_dir)
    _refuse_inputs(
        ns,
        [
            ("--json" if ns.json else "--out", json_path),
            ("--markdown" if ns.markdown else "--out", md_path),
            *(("--save-examples", p) for p in pngs),
        ],
    )
    configs = _preflight(ns, eps_given=ns.eps is not None)
    refuse_cpu_fp16(ns.precision, resolve_device(ns.device))
    note = slow_bf16_note(resolve_device(ns.device), ns.precision)
    if note and env_info().is_main:
        print(note, file=sys.stderr)
    if not ns.transfer:  # one model counted as two seeds would fake a std
        _refuse_repeats(ns.run, ns.model)
    if ns.eps is None:
        eps = _default_eps(getattr(ns, "eps_from", ns.run[0]))
        if not 0 <= eps <= 1:
            raise UsageError(f"--eps: the run's training eps {eps} is not in [0, 1]; pass --eps")
    fold_bn = {"auto": None, "on": True, "off": False}[ns.fold_bn]
    common = dict(
        test_subset=ns.test_subset,
        dataset=ns.dataset,
        data_dir=ns.data_dir,
        batch_size=ns.batch_size,
        device=ns.device,
        role=ns.model,
        seed=ns.seed,
        progress=ns.progress,
    )

    if ns.transfer or ns.transfer_matrix:
        surs = list(ns.run) if ns.transfer_matrix else [ns.run[0]]
        tgts = list(ns.run) if ns.transfer_matrix else list(ns.run[1:])
        result = transfer_matrix(
            surs, tgts, eps=eps, step_size=step, steps=20, fold_bn=fold_bn,
            precision=ns.precision, **common,
        )  # fmt: skip
        md = "### Black-box transfer (Table 3)\n\n" + table3(result)
        print(md)
        _write(result, md, json_path, md_path, ns)
        return 0

    options = dict(
        suite="sanity" if ns.sanity and ns.suite == "basic" else ns.suite,
        sanity=ns.sanity,
        pgd_steps=pgd_steps,
        eps_sweep=eps_sweep,
        sweep_steps=ns.sweep_steps,
        min_pert=min_pert,
        min_pert_search_steps=ns.min_pert_search_steps,
        autoattack=ns.autoattack,
        square_queries=ns.square_queries,
        targeted=ns.targeted,
        surrogates=tuple(ns.surrogate),
        num_examples=ns.num_examples,
        fold_bn=fold_bn,
    )
    results = []
    for i, path in enumerate(ns.run):
        if ns.progress and len(ns.run) > 1:
            print(f"[{i + 1}/{len(ns.run)}] {path}", file=sys.stderr)
        r = evaluate_run(
            path,
            attack=ns.attack,
            steps=ns.steps,
            restarts=ns.restarts,
            eps=eps,
            step_size=step,
            loss=ns.loss,
            precision=ns.precision,
            save_examples=pngs[i],
            **common,
            **options,
        )
        results.append(r)
        _print_summary(r, ns, eps)
        if r.get("sanity"):
            print(format_checks(r["sanity"]))
    groups = group_results(results, configs)
    if len(results) == 1:
        result = results[0]
    else:
        result = {"runs": results}
        if len(groups) == 1:  # repeats of one configuration: the mean over all
            agg = aggregate(results)
            result |= {
                "aggregate": agg,
                "clean_acc": agg.get("clean_acc", {}).get("mean"),
                "robust_acc": agg.get("robust_acc", {}).get("mean"),
            }
        result["groups"] = [
            {
                "label": group_label([results[i] for i in g]),
                "runs": [results[i]["run"] for i in g],
                "aggregate": aggregate([results[i] for i in g]) if len(g) > 1 else None,
            }
            for g in groups
        ]
        if len({r["n"] for r in results}) == 1 and all(
            r["indices"] == results[0]["indices"] for r in results
        ):
            result |= {"n": results[0]["n"], "indices": results[0]["indices"]}
    md = markdown(results, groups=groups)
    if ns.suite != "basic" or ns.sanity or len(results) > 1:
        print()
        print(md)
    _write(result, md, json_path, md_path, ns)
    if not json_path and ns.suite == "basic" and not ns.sanity and "robust_acc" in result:
        print(json.dumps({k: result.get(k) for k in ("clean_acc", "robust_acc", "n")}))
    return 0


def _print_summary(r: dict, ns: argparse.Namespace, eps: float) -> None:
    from actrain.evaluation.report import basic_attack_name

    step = None
    if "robust_acc_attack" in r:
        what = r["robust_acc_attack"]
        first = next(iter(r.get("pgd", {}).values()), {})
        step = first.get("attack", {}).get("step_size")
    elif ns.attack == "pgd":
        what = basic_attack_name(r)
        step = r.get("attack", {}).get("step_size")
    else:
        what = {"fgsm": "FGSM", "autoattack": "AutoAttack"}[ns.attack]
    if ns.precision != "fp32" and ns.attack == "pgd":
        what += f" ({ns.precision} gradients, fp32 verdicts)"
    setting = f"eps {eps:.4f}" + (f", step {step:.4g}" if step is not None else "")
    print(
        f"{r['run']} [{r['model'].upper()}]  clean {r['clean_acc']:.2f}%  "
        f"{what} ({setting}) {r['robust_acc']:.2f}%  on {r['n']} test images"
    )


def _write(
    result: dict, md: str, json_path: str | None, md_path: str | None, ns: argparse.Namespace
) -> None:
    from actrain.evaluation import write_json

    argv = getattr(ns, "argv", None)
    if json_path:
        if argv:  # the exact command, so that reports can show what produced each number
            command = shlex.join(["actrain", *map(str, argv)])
            result["command"] = command
            for r in result.get("runs", []):
                if isinstance(r, dict):
                    r["command"] = command
        try:
            write_json(result, json_path)
        except OSError as exc:
            flag = "--json" if ns.json else "--out"
            raise UsageError(f"{flag}: cannot write {json_path} ({exc.strerror or exc})") from None
    if md_path:
        try:
            Path(md_path).parent.mkdir(parents=True, exist_ok=True)
            Path(md_path).write_text(md)
        except OSError as exc:
            flag = "--markdown" if ns.markdown else "--out"
            raise UsageError(f"{flag}: cannot write {md_path} ({exc.strerror or exc})") from None
