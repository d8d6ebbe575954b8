"""Reading evaluation results (``RUN/eval/**/*.json``) into rows for the report's tables.

The reader is deliberately tolerant: it walks any JSON object and picks up

- **attack results**: any object with ``robust_acc`` (and usually ``clean_acc``, ``n`` and an
  ``attack`` object with ``name``/``steps``/``restarts``/``eps``), as written by ``actrain eval``
  (the base command, and the suite's ``pgd: {"20": {...}, ...}``, ``autoattack`` and
  ``black_box.square`` entries); an object without an attack name is named by its key; the
  object's (or an enclosing object's) ``model`` (``g``/``f``) names the model, default G;
- **minimum perturbation**: keys ``min_perturbation``/``minimum_perturbation``/
  ``mean_min_perturbation`` holding a number, an object with ``mean``, or one such object per
  method (``{"fgsm-k": {"mean": ...}, "pgd-search": {"mean": ...}}``);
- **epsilon sweeps** (Table 5): key ``eps_sweep`` holding ``[{"eps", "robust_acc"}]``,
  ``{"rows": [...]}`` or ``{eps: acc}``, and attacks of one name evaluated at 3+ epsilons;
- **transfer** (Table 3): objects with ``surrogate``, ``target`` and ``success_rate`` (percent),
  a matrix ``{"targets", "surrogates", "success_rate": {target: {surrogate: rate}}}``, or
  ``transfer: {surrogate: {"success_rate": ...}}`` inside one run's result;
- **sanity checks**: key ``sanity``/``sanity_checks``/``checks`` holding
  ``[{"name", "passed", ...}]``, ``{"checks": [...]}`` or ``{name: bool | {"passed": ...}}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SKIP = {"indices", "robust_examples", "attack", "config", "per_example", "settings", "details"}
MIN_PERT_KEYS = ("min_perturbation", "minimum_perturbation", "mean_min_perturbation")
SANITY_KEYS = ("sanity", "sanity_checks", "checks")


@dataclass
class EvalData:
    """Everything found in one run's evaluation files, per model role."""

    # role, name, eps, clean_acc, robust_acc, n, restarts, step_size, file
    attacks: list[dict[str, Any]] = field(default_factory=list)
    min_pert: list[dict[str, Any]] = field(default_factory=list)  # role, value, file
    eps_sweep: list[dict[str, Any]] = field(default_factory=list)  # role, name, eps, robust_acc
    transfer: list[dict[str, Any]] = field(default_factory=list)  # surrogate, target, rate
    sanity: list[dict[str, Any]] = field(default_factory=list)  # role, name, passed, detail
    files: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def roles(self) -> set[str]:
        return {a["role"] for a in self.attacks}


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict) and isinstance(v.get("mean"), (int, float)):
        return float(v["mean"])
    return None


def attack_name(obj: dict[str, Any], key: str | None = None) -> str:
    att = obj.get("attack") if isinstance(obj.get("attack"), dict) else {}
    name = att.get("name") or obj.get("attack_name")
    if not name and isinstance(obj.get("robust_acc_attack"), str):
        name = re.sub(r"x\d+$", "", obj["robust_acc_attack"])  # "PGD-20x5" -> "PGD-20"
    if not name and key and not key.isdigit():
        name = key.replace("_", " ").title() if key.islower() else key
    if not name and isinstance(obj.get("attack"), str):
        name = obj["attack"]
    steps = att.get("steps", obj.get("steps"))
    if not name:
        name = f"PGD-{steps}" if steps is not None else "robust"
    name = str(name)
    if name.lower() == "pgd" and steps is not None:
        name = f"PGD-{steps}"
    loss = att.get("loss", obj.get("loss"))
    if loss and loss != "ce":
        name += f" ({loss})"
    return name


def read_eval(obj: dict[str, Any], file: str = "") -> EvalData:
    out = EvalData(files=[file] if file else [])
    _walk(obj, "g", out, file)
    return out


def merge(items: list[EvalData]) -> EvalData:
    m = EvalData()
    for it in items:
        for f in ("attacks", "min_pert", "eps_sweep", "transfer", "sanity", "files", "commands"):
            getattr(m, f).extend(getattr(it, f))
    _promote_eps_sweeps(m)
    return m


def _walk(
    obj: Any, role: str, out: EvalData, file: str, key: str | None = None, run: str = ""
) -> None:
    if isinstance(obj, list):
        for item in obj:
            _walk(item, role, out, file, key, run)
        return
    if not isinstance(obj, dict):
        return
    if obj.get("model") in ("g", "f"):
        role = obj["model"]
    elif obj.get("role") in ("g", "f"):
        role = obj["role"]
    if isinstance(obj.get("run"), str):
        run = obj["run"]
    if isinstance(obj.get("command"), str) and obj["command"] not in out.commands:
        out.commands.append(obj["command"])
    if {"surrogate", "target"} <= obj.keys():
        rate = _num(obj.get("success_rate"))
        if rate is None and _num(obj.get("robust_acc")) is not None:
            rate = 100.0 - float(_num(obj["robust_acc"]))
        if rate is not None:
            out.transfer.append(
                {"surrogate": str(obj["surrogate"]), "target": str(obj["target"]), "rate": rate}
            )
        return
    if isinstance(obj.get("success_rate"), dict) and "targets" in obj:
        for tgt, row in obj["success_rate"].items():
            for sur, rate in (row or {}).items():
                if _num(rate) is not None:
                    out.transfer.append({"surrogate": sur, "target": tgt, "rate": _num(rate)})
        return
    summary = isinstance(obj.get("pgd"), dict) and "robust_acc_attack" in obj
    if "robust_acc" in obj and _num(obj["robust_acc"]) is not None and not summary:
        att = obj.get("attack") if isinstance(obj.get("attack"), dict) else {}
        eps = att.get("eps", obj.get("eps"))
        out.attacks.append(
            {
                "role": role,
                "name": attack_name(obj, key),
                "eps": float(eps) if isinstance(eps, (int, float)) else None,
                "clean_acc": _num(obj.get("clean_acc")),
                "robust_acc": float(_num(obj["robust_acc"])),
                "n": obj.get("n"),
                "restarts": att.get("restarts", obj.get("restarts")),
                "step_size": _num(att.get("step_size", obj.get("step_size"))),
                "file": file,
            }
        )
    for k, value in obj.items():
        if k in SKIP:
            continue
        if k in MIN_PERT_KEYS:
            _min_pert(value, role, out, file)
            continue
        if k == "eps_sweep":
            _eps_sweep(value, role, out)
            continue
        if k in SANITY_KEYS:
            _sanity(value, role, out)
            continue
        if k == "transfer" and isinstance(value, dict) and run:
            for sur, t in value.items():
                if isinstance(t, dict) and _num(t.get("success_rate")) is not None:
                    out.transfer.append(
                        {"surrogate": sur, "target": run, "rate": _num(t["success_rate"])}
                    )
            continue
        if isinstance(value, (dict, list)):
            _walk(value, role, out, file, k, run)


def _min_pert(value: Any, role: str, out: EvalData, file: str) -> None:
    if _num(value) is not None:
        out.min_pert.append({"role": role, "name": "", "value": float(_num(value)), "file": file})
    elif isinstance(value, dict):
        for method, v in value.items():
            if isinstance(v, dict) and _num(v.get("mean")) is not None:
                out.min_pert.append(
                    {"role": role, "name": method, "value": float(v["mean"]), "file": file}
                )


def _eps_sweep(value: Any, role: str, out: EvalData) -> None:
    if isinstance(value, dict):
        for k in ("rows", "results"):
            if isinstance(value.get(k), list):
                value = value[k]
                break
    if isinstance(value, dict):
        for k, v in value.items():
            try:
                eps = float(k)
            except ValueError:
                continue
            acc = _num(v if not isinstance(v, dict) else v.get("robust_acc"))
            if acc is not None:
                out.eps_sweep.append({"role": role, "name": "eps sweep", "eps": eps, "acc": acc})
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and _num(item.get("eps")) is not None:
                acc = _num(item.get("robust_acc", item.get("acc")))
                if acc is not None:
                    out.eps_sweep.append(
                        {
                            "role": item.get("model", role),
                            "name": "eps sweep",
                            "eps": float(item["eps"]),
                            "acc": acc,
                        }
                    )


def _sanity(value: Any, role: str, out: EvalData) -> None:
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict) and isinstance(value.get("checks"), list):
        value = value["checks"]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(v.get("name", v.get("check", i))), v) for i, v in enumerate(value)]
    for name, v in items:
        if isinstance(v, bool):
            out.sanity.append({"role": role, "name": name, "passed": v, "detail": ""})
        elif isinstance(v, dict):
            passed = v.get("passed", v.get("pass", v.get("ok")))
            if passed is None and isinstance(v.get("status"), str):
                passed = v["status"]
            detail = v.get("detail", v.get("message", ""))
            if not detail:
                skip = ("name", "check", "passed", "pass", "status")
                rest = {k: x for k, x in v.items() if k not in skip}
                detail = ", ".join(f"{k}={x}" for k, x in rest.items() if not isinstance(x, list))
            out.sanity.append(
                {
                    "role": v.get("model", role),
                    "name": name,
                    "passed": passed,
                    "detail": str(detail),
                }
            )


def _promote_eps_sweeps(m: EvalData) -> None:
    """An attack evaluated at three or more epsilons is an epsilon sweep (Table 5)."""
    by: dict[tuple[str, str], set[float]] = {}
    for a in m.attacks:
        if a["eps"] is not None:
            by.setdefault((a["role"], a["name"]), set()).add(round(a["eps"], 6))
    for (role, name), epss in by.items():
        if len(epss) >= 3:
            for a in m.attacks:
                if a["role"] == role and a["name"] == name and a["eps"] is not None:
                    m.eps_sweep.append(
                        {"role": role, "name": name, "eps": a["eps"], "acc": a["robust_acc"]}
                    )
