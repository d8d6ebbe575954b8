"""Gradient-masking sanity checks (ACT paper section 4.5; Athalye et al., Carlini et al.).

Each check works on numbers the suite already measured and reports pass, fail, or skipped
(when what it needs was not measured), with the numbers it compared. ``tol`` is in accuracy
percentage points; the default is one example of the evaluated set, the granularity of the
measurement itself.
"""

from __future__ import annotations

from typing import Any

_MASKING_WORDS = ("zero gradient", "Square", "randomized")
#: The eps (/255) at which every image must fall: the paper's Table 5 has every defence at 0
#: there, and still above 0 at 50/255, so a sweep ending lower cannot fail the check honestly.
LARGE_EPS_255 = 100


def _check(name: str, passed: bool | None, detail: str, **numbers: Any) -> dict[str, Any]:
    status = "skipped" if passed is None else ("pass" if passed else "FAIL")
    return {"name": name, "status": status, "passed": passed, "detail": detail, **numbers}


def sanity_checks(result: dict[str, Any], tol: float | None = None) -> dict[str, Any]:
    n = result.get("n") or 1
    tol = 100.0 / n if tol is None else tol
    pgd = result.get("pgd", {})
    pgd_acc = {int(k): v["robust_acc"] for k, v in pgd.items()}
    checks = []

    # 1. white-box beats black-box
    white = min(pgd_acc.values()) if pgd_acc else None
    black = {}
    bb = result.get("black_box", {})
    if "square" in bb:
        black["Square"] = bb["square"]["robust_acc"]
    for sur, t in bb.get("transfer", {}).items():
        # robust as PGD counts it: correct clean and on the transferred image (target_acc
        # also counts a misclassified image the perturbation put right; older JSON has only it)
        black[f"transfer from {sur}"] = t.get("robust_acc", t["target_acc"])
    if white is None or not black:
        checks.append(_check("white-box beats black-box", None, "needs PGD and a black-box run"))
    else:
        worst = min(black, key=black.get)
        ok = black[worst] >= white - tol
        checks.append(
            _check(
                "white-box beats black-box",
                ok,
                f"white-box PGD {white:.2f}% vs best black-box ({worst}) {black[worst]:.2f}%",
                white_box_acc=white,
                black_box_acc=black,
            )
        )

    # 2. accuracy falls monotonically with eps and reaches 0
    sweep = sorted(result.get("eps_sweep", {}).get("rows") or [], key=lambda r: r["eps_255"])
    if not sweep:
        checks.append(_check("accuracy monotone in eps", None, "needs the eps sweep"))
        checks.append(_check("accuracy reaches 0 at large eps", None, "needs the eps sweep"))
    else:
        accs = [r["robust_acc"] for r in sweep]
        rises = [
            (sweep[i]["eps_255"], sweep[i + 1]["eps_255"])
            for i in range(len(accs) - 1)
            if accs[i + 1] > accs[i] + tol
        ]
        checks.append(
            _check(
                "accuracy monotone in eps",
                not rises,
                "non-increasing" if not rises else f"rises between eps(/255) {rises}",
                accuracies=accs,
            )
        )
        last = sweep[-1]
        short = last["eps_255"] < LARGE_EPS_255  # a short sweep proves nothing either way
        reached = {} if short else {"accuracy": last["robust_acc"]}
        checks.append(
            _check(
                "accuracy reaches 0 at large eps",
                None if short else last["robust_acc"] <= tol,
                f"the largest eps swept is {last['eps_255']}/255; needs {LARGE_EPS_255}/255"
                if short
                else f"{last['robust_acc']:.2f}% at eps {last['eps_255']}/255",
                **reached,
            )
        )

    # 3. more steps never increase robust accuracy
    if len(pgd_acc) < 2:
        checks.append(_check("more steps never help the model", None, "needs PGD at 2+ k"))
    else:
        ks = sorted(pgd_acc)
        bad = [(a, b) for a, b in zip(ks, ks[1:], strict=False) if pgd_acc[b] > pgd_acc[a] + tol]
        checks.append(
            _check(
                "more steps never help the model",
                not bad,
                ", ".join(f"PGD-{k} {pgd_acc[k]:.2f}%" for k in ks),
                accuracies={str(k): pgd_acc[k] for k in ks},
            )
        )

    # 4. AutoAttack <= PGD (strict: AA must not leave more examples robust than PGD)
    aa = result.get("autoattack")
    if aa is None or white is None:
        checks.append(_check("AutoAttack <= PGD", None, "needs AutoAttack and PGD"))
    else:
        checks.append(
            _check(
                "AutoAttack <= PGD",
                aa["robust_acc"] <= white,
                f"AutoAttack {aa['robust_acc']:.2f}% vs PGD {white:.2f}%",
                autoattack_acc=aa["robust_acc"],
                pgd_acc=white,
            )
        )
        masking = [f for f in aa.get("flags", []) if any(w in f for w in _MASKING_WORDS)]
        # Informational: saturated CE can give exact zero gradients on a sound model too.
        flag = _check("AutoAttack flags", None, "; ".join(masking) if masking else "no flag")
        flag["status"] = "warn" if masking else "info"
        checks.append(flag)
    run = [c for c in checks if c["passed"] is not None]
    return {
        "passed": all(c["passed"] for c in run) if run else None,
        "tolerance_pct": tol,
        "checks": checks,
    }


def format_checks(sanity: dict[str, Any]) -> str:
    lines = [f"  [{c['status']:>7}] {c['name']}: {c['detail']}" for c in sanity["checks"]]
    return "\n".join(lines)
