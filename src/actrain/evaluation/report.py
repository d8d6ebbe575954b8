"""Markdown tables laid out like the ACT paper's, and mean +- std over several runs."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# Keys whose values are bookkeeping, not measurements: never averaged.
_SKIP = {
    "attack",
    "settings",
    "indices",
    "robust_examples",
    "correct_examples",
    "per_example",
    "seconds",
    "flags",
    "checks",
    "n",
    "n_correct",
    "eps",
    "eps_255",
    "step_size",
    "attack_passes",
    "attack_passes_without_early_stop",
    "forward_passes",
    "tolerance_pct",
}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """For every measurement present in all results: {"mean", "std", "values"} (sample std,
    ddof=1; 0 for a single run). Lists of rows (the eps sweep) are aligned by position."""

    def walk(items: list[Any]) -> Any:
        first = items[0]
        if all(_is_num(v) for v in items):
            vals = [float(v) for v in items]
            finite = [v for v in vals if math.isfinite(v)]
            mean = statistics.fmean(finite) if finite else float("nan")
            std = statistics.stdev(finite) if len(finite) > 1 else 0.0
            return {"mean": mean, "std": std, "values": vals}
        if all(isinstance(v, dict) for v in items):
            out = {}
            for k in first:
                if k in _SKIP or not all(k in v for v in items):
                    continue
                sub = walk([v[k] for v in items])
                if sub is not None:
                    out[k] = sub
            for k in ("eps_255",):
                if k in first:
                    out[k] = first[k]
            return out or None
        if all(isinstance(v, list) for v in items) and len({len(v) for v in items}) == 1:
            if first and isinstance(first[0], dict):
                rows = [walk([v[i] for v in items]) for i in range(len(first))]
                return rows
        return None

    return walk(results) or {}


def pm(stat: Any, digits: int = 2) -> str:
    """'mean±std' for an aggregate entry, or the plain number."""
    if stat is None:
        return "–"
    if isinstance(stat, dict):
        if len(stat["values"]) == 1:
            return f"{stat['mean']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"
    if isinstance(stat, float) and math.isnan(stat):
        return "–"
    return f"{stat:.{digits}f}"


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if d is None:
            return None
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and p < len(d):
            d = d[p]
        else:
            return None
    return d


def dataset_cell(result: dict[str, Any]) -> str:
    """``cifar10``; ``imagefolder (tiny-imagenet)`` for an image folder, as two folders are two
    data sets and the table must not give them one name."""
    name = str(result.get("dataset", ""))
    folder = result.get("data_dir")
    return f"{name} ({Path(str(folder)).name or folder})" if folder else name


def _label(result: dict[str, Any]) -> str:
    return result.get("label") or result.get("run", "?")


def attack_variant(a: dict[str, Any]) -> str:
    """' targeted-N (margin)': what sets an attack apart from untargeted CE PGD, or ''."""
    out = f" targeted-{a['targeted']}" if a.get("targeted") else ""
    return out + (f" ({a['loss']})" if a.get("loss") not in (None, "ce") else "")


def basic_attack_name(result: dict[str, Any]) -> str:
    """The one attack of a basic-suite result as the table names it: PGD-20x5, FGSM,
    AutoAttack (with a non-default loss or targeting)."""
    a = result.get("attack") if isinstance(result.get("attack"), dict) else {}
    name = str(a.get("name") or "A_rob")
    if name.startswith("PGD") and a.get("restarts"):
        name += f"x{a['restarts']}"
    return name + attack_variant(a)


def _basic_note(example: dict[str, Any]) -> str:
    a = example.get("attack") if isinstance(example.get("attack"), dict) else {}
    eps = a.get("eps", example.get("eps"))
    what = f"{basic_attack_name(example)}: accuracy (%) under white-box {a.get('name', '?')}"
    if eps is not None:
        what += f", L∞ eps {eps:.4f}"
    if a.get("step_size") is not None:
        what += f", step {a['step_size']}"
    if a.get("restarts"):
        n = a["restarts"]
        what += f", {n} random restart{'s' if n != 1 else ''}, worst case per example"
    return what + f"; n = {example.get('n')} test images."


def table2(rows: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    """rows: (label, an example result for settings, aggregate or result for numbers)."""
    if not rows:
        return ""
    _, example, _ = rows[0]
    steps = sorted(int(k) for k in example.get("pgd", {}))
    restarts = _get(example, "pgd", str(steps[0]), "attack", "restarts") if steps else None
    # the basic suite's one attack (PGD, FGSM or AutoAttack): its robust accuracy column
    basic = not steps and "autoattack" not in example and "robust_acc" in example
    mp = example.get("min_perturbation", {})
    mp_methods = [m for m in ("fgsm-k", "pgd-search") if m in mp]
    variant = attack_variant(_get(example, "pgd", str(steps[0]), "attack") or {}) if steps else ""
    head = ["Defense", "Dataset", "A_nat"] + [f"PGD-{k}{variant}" for k in steps]
    if basic:
        head.append(basic_attack_name(example))
    head += [
        {"fgsm-k": "Min. pert. (FGSM^k)", "pgd-search": "Min. pert. (PGD search)"}[m]
        for m in mp_methods
    ]
    if "autoattack" in example:
        head.append("AutoAttack")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ex, num in rows:
        cells = [label, dataset_cell(ex), pm(num.get("clean_acc"))]
        cells += [pm(_get(num, "pgd", str(k), "robust_acc")) for k in steps]
        if basic:
            cells.append(pm(num.get("robust_acc")))
        cells += [pm(_get(num, "min_perturbation", m, "mean"), 5) for m in mp_methods]
        if "autoattack" in example:
            cells.append(pm(_get(num, "autoattack", "robust_acc")))
        lines.append("| " + " | ".join(cells) + " |")
    eps = _get(example, "eps")
    step_of = {k: _get(example, "pgd", str(k), "attack", "step_size") for k in steps}
    if len(set(step_of.values())) > 1:
        step = ", ".join(f"{v} (PGD-{k})" for k, v in step_of.items())
    else:
        step = str(next(iter(step_of.values()), None))
    notes = [
        f"A_rob: accuracy (%) under white-box PGD-k{variant}, L∞ eps {eps:.4f}, step {step},"
        f" {restarts} random restarts, worst case per example; n = {example.get('n')} test"
        " images."
        if steps and eps is not None
        else ""
    ]
    if basic:
        notes.append(_basic_note(example))
    for m in mp_methods:
        counts = []
        for label, ex, num in rows:
            info = _get(ex, "min_perturbation", m) or {}
            if num is not ex:  # a configuration's mean over its runs
                counts.append(f"{label}: per run, in the JSON")
            else:
                counts.append(f"{label}: {info.get('n_found')} of {info.get('n_correct')}")
        found = counts[0].split(": ", 1)[1] if len(rows) == 1 else "; ".join(counts)
        notes.append(
            f"Min. pert. ({m}): mean L∞ distance over the correctly classified images where an"
            f" adversarial example was found ({found})."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n"


def table5(rows: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    rows = [r for r in rows if r[1].get("eps_sweep")]
    if not rows:
        return ""
    example = rows[0][1]["eps_sweep"]
    eps = [r["eps_255"] for r in example["rows"]]
    head = ["Defense"] + [f"{e:g}" for e in eps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, num in rows:
        cells = [label] + [
            pm(_get(num, "eps_sweep", "rows", i, "robust_acc")) for i in range(len(eps))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    a = example["attack"]
    note = (
        f"- Accuracy (%) under {a['name']} x{a['restarts']} at eps in units of 1/255; step "
        f"{a['step_size_rule']}."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def table3(matrix: dict[str, Any]) -> str:
    """Transfer success rates: rows defence (target), columns surrogate."""
    surs = matrix["surrogates"]
    tgts = matrix["targets"]
    head = ["Def \\ Sur"] + [matrix["labels"][s] for s in surs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tgts:
        cells = [matrix["labels"][t]]
        for s in surs:
            cell = matrix["success_rate"].get(t, {}).get(s)
            cells.append(pm(cell))
        lines.append("| " + " | ".join(cells) + " |")
    a = matrix["attack"]
    note = (
        f"- Success rate (%) of {a['name']} examples (eps {a['eps']:.4f}, step {a['step_size']}, "
        f"made on the surrogate) on the defence: lower is more robust; n = {matrix['n']}."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def sanity_table(label: str, sanity: dict[str, Any]) -> str:
    lines = [f"Sanity checks for {label}:", "", "| Check | Result | Numbers |", "|---|---|---|"]
    for c in sanity["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['detail']} |")
    return "\n".join(lines) + "\n"


def configuration_key(config: dict[str, Any], result: dict[str, Any]) -> str | None:
    """What makes two evaluated runs repeats of one configuration: the training config without
    the seed and settings that change nothing trained (as ``actrain report`` groups runs),
    the evaluated model (G or F) and the data set evaluated on. None without a config: such a
    run is never averaged with another."""
    if not config:
        return None
    from actrain.analysis.runs import semantic_settings

    key = {
        "config": semantic_settings(config),
        "model": result.get("model"),
        "dataset": result.get("dataset"),
        "data_dir": result.get("data_dir"),  # an image folder's: each folder its own data set
    }
    return json.dumps(key, sort_keys=True, default=str)


def group_results(results: list[dict[str, Any]], configs: list[dict[str, Any]]) -> list[list[int]]:
    """Positions of ``results`` grouped by configuration (:func:`configuration_key`), in the
    order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, (r, c) in enumerate(zip(results, configs, strict=True)):
        key = configuration_key(c, r)
        groups.setdefault(key if key is not None else f"#{i}", []).append(i)
    return list(groups.values())


def group_label(members: list[dict[str, Any]]) -> str:
    if len(members) == 1:
        return _label(members[0])
    return members[0].get("label", "runs") + f" (mean±std of {len(members)})"


def markdown(
    results: list[dict[str, Any]],
    agg: dict[str, Any] | None = None,
    groups: list[list[int]] | None = None,
) -> str:
    """Tables 2 and 5: one row per run, one mean±std row when ``agg`` is given (all results
    one configuration), or one row per group of ``groups`` (positions in ``results``: a
    configuration's mean±std, or a run alone); and the sanity checks of each run."""
    if groups is not None:
        rows = []
        for g in groups:
            members = [results[i] for i in g]
            num = aggregate(members) if len(members) > 1 else members[0]
            rows.append((group_label(members), members[0], num))
    elif agg is not None:
        rows = [(group_label(results), results[0], agg)]
    else:
        rows = [(_label(r), r, r) for r in results]
    parts = []
    t2 = table2(rows)
    if t2:
        parts.append("### White-box robustness (Table 2)\n\n" + t2)
    t5 = table5(rows)
    if t5:
        k = rows[0][1]["eps_sweep"]["attack"]["name"]
        parts.append(f"### Accuracy vs eps, {k} (Table 5)\n\n" + t5)
    if results and results[0].get("transfer"):
        parts.append("### Black-box transfer (Table 3)\n\n" + table3(results[0]["transfer"]))
    for r in results:
        if r.get("sanity"):
            parts.append(sanity_table(_label(r), r["sanity"]))
    return "\n".join(parts)
