"""Tensor-level evaluation protocols: each takes a model and (x, y) on its device and returns a
JSON-ready dict holding its numbers (percent) and the exact settings that produced them.

Every protocol reports per-example outcomes as positions into the evaluated tensors; the suite
adds ``indices``, the test-set index of each position.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actrain.attacks import pgd_robustness
from actrain.attacks.autoattack import STANDARD_ATTACKS, autoattack, square_attack
from actrain.attacks.base import LinfBall, eval_mode
from actrain.attacks.fgsm import fgsm
from actrain.attacks.minimum_perturbation import (
    MinPerturbation,
    fgsm_k_minimum_perturbation,
    linf_distance,
    pgd_search_minimum_perturbation,
)
from actrain.attacks.pgd import eval_objective, pgd
from actrain.outputs import live_progress
from actrain.runtime import autocast_factory, gradient_model, resolve_precision

PAPER_PGD_STEPS = (20, 100, 1000)
PAPER_EPS_SWEEP = (1, 5, 10, 15, 20, 25, 50, 100)  # units of 1/255 (Table 5)
PAPER_STEP_SIZE = 0.003  # the paper's evaluation step, for eps 0.031


def pgd_step_size(eps: float, steps: int, step_size: float | None = None) -> float:
    """``step_size`` if given, else the paper's 0.003 unless k steps of it cannot reach the
    ball's surface (eps 0.1 with PGD-20: 0.06 < 0.1), where a weak attack would overstate
    robustness; then 2.5 eps / k, Madry et al.'s rule."""
    if step_size is not None:
        return step_size
    k = max(steps, 1)
    return PAPER_STEP_SIZE if PAPER_STEP_SIZE * k >= eps else 2.5 * eps / k


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pct(count: int | float, n: int) -> float:
    return 100.0 * float(count) / n if n else float("nan")


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="img", disable=not live_progress(progress), leave=False
    )


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    device = _device(model)
    with eval_mode(model):
        return torch.cat(
            [
                model(x[s : s + batch_size].to(device)).argmax(1).cpu()
                for s in range(0, len(x), batch_size)
            ]
        )


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> dict:
    _check_data(x, y, batch_size)
    correct = predict(model, x, batch_size) == y.cpu()
    return {
        "clean_acc": _pct(correct.sum(), len(y)),
        "n": len(y),
        "correct_examples": correct.nonzero().squeeze(1).tolist(),
    }


def _targets_by_rank(model: nn.Module, x: Tensor, y: Tensor, rank: int) -> Tensor:
    """The class with the ``rank``-th highest clean logit among classes other than y."""
    with torch.no_grad(), eval_mode(model):
        logits = model(x).float()
    logits.scatter_(1, y[:, None], -math.inf)
    return logits.topk(rank, dim=1).indices[:, rank - 1]


def _check_data(x: Tensor, y: Tensor, batch_size: int = 1) -> None:
    """Images in [0, 1] and class labels that match, and some of them: each mistake failed
    deep in an attack with an internal error, or (images in 0..255, no examples) gave numbers
    that looked like results."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y: expected tensors, got {type(x).__name__}, {type(y).__name__}")
    if len(x) != len(y):
        raise ValueError(f"x holds {len(x)} images and y {len(y)} labels")
    if len(y) == 0:
        raise ValueError("no examples to evaluate (x and y are empty)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected float32 images in [0, 1], got {x.dtype} (uint8: x / 255)")
    if y.dim() != 1 or y.dtype != torch.int64:
        raise TypeError(
            f"y: expected int64 class labels of shape [N], got {y.dtype} {tuple(y.shape)}"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"x: images must lie in [0, 1] (the model normalises), got [{lo:g}, {hi:g}]"
        )
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")


def _search(model: nn.Module, fold_bn: bool | None, precision: str):
    """(precision, its autocast factory, the gradient model) of an attack on ``model``: the
    search runs in ``precision`` (auto: bf16 where it pays), the verdicts always in fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    device = _device(model)
    precision = resolve_precision(precision, device)
    return precision, autocast_factory(precision, device), gradient_model(model, fold_bn, precision)


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float | None = None,
    steps: int = 20,
    restarts: int = 5,
    loss: str = "ce",
    targeted: int = 0,
    batch_size: int = 256,
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = False,
    early_stop: bool = True,
    fold_bn: bool | None = None,
) -> dict[str, Any]:
    """Clean and white-box PGD accuracy (percent), worst case over restarts per example.

    The input gradients come from :func:`actrain.runtime.gradient_model` (``fold_bn``; by
    default the BN-folded channels_last view on a CPU) in ``precision``; every verdict comes
    from ``model`` in fp32, so a bf16 search never counts an example the model gets right.

    ``targeted`` > 0 runs the multi-targeted variant: for each of the ``targeted`` classes with
    the highest clean logits (other than the label), R restarts of targeted PGD; an example is
    robust only if it survives all of them. ``step_size`` None: :func:`pgd_step_size`.
    """
    _check_data(x, y, batch_size)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps: must be an integer >= 0, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 1:
        raise ValueError(f"restarts: must be an integer >= 1, got {restarts!r}")
    if not isinstance(targeted, numbers.Integral) or targeted < 0:
        raise ValueError(f"targeted: must be an integer >= 0, got {targeted!r}")
    if not isinstance(eps, numbers.Real) or not 0 <= eps <= 1:
        raise ValueError(f"eps: must be a number in [0, 1], got {eps!r} (8/255, not '8/255')")
    step_size = pgd_step_size(eps, steps, step_size)
    device = _device(model)
    precision, autocast, steer = _search(model, fold_bn, precision)
    gen = torch.Generator(device=device).manual_seed(seed)
    clean = robust = passes = 0
    robust_mask = torch.zeros(len(y), dtype=torch.bool)
    clean_mask = torch.zeros(len(y), dtype=torch.bool)
    x_adv_all = torch.empty_like(x, device="cpu")
    if targeted and len(y):
        with torch.no_grad(), eval_mode(model):
            classes = model(x[:1].to(device)).shape[1]
        if targeted > classes - 1:
            raise ValueError(
                f"targeted={targeted}: the model has {classes} classes, so at most"
                f" {classes - 1} wrong ones to target"
            )
    name = f"PGD-{steps}x{restarts}" + (f" targeted-{targeted}" if targeted else "")
    bar = _bar(len(y), name, progress)
    t0 = time.perf_counter()
    # ---- issue 5 (torchrun): each process takes every N-th batch; one generator per batch ----
    from actrain import distributed

    starts = distributed.shard_starts(len(y), batch_size)
    for s in starts:
        gen = distributed.batch_generator(device, seed, s)
        # ---- end issue 5 ----
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        ranks = range(1, targeted + 1) if targeted else [0]
        alive = None
        for r in ranks:
            # with early stop, a later target class attacks only the examples still standing
            rows = alive.nonzero().squeeze(1) if early_stop and alive is not None else None
            if rows is not None and rows.numel() == 0:
                break
            tgt = _targets_by_rank(model, xb, yb, r) if r else None
            xs, ys = (xb, yb) if rows is None else (xb[rows], yb[rows])
            if tgt is not None and rows is not None:
                tgt = tgt[rows]
            res = pgd_robustness(
                model,
                xs,
                ys,
                eps,
                step_size,
                steps,
                restarts,
                loss=loss,
                autocast=autocast,
                generator=gen,
                early_stop=early_stop,
                target=tgt,
                gradient_model=steer,
                verdict_autocast=contextlib.nullcontext,
            )
            passes += res.forward_passes
            if alive is None:  # the first (or only) attack: every example's outcome
                clean_b = res.clean_correct
                alive = res.robust.clone()
                x_best = res.x_adv.clone()
            elif rows is None:
                broken_now = alive & ~res.robust
                x_best[broken_now] = res.x_adv[broken_now]
                alive &= res.robust
            else:
                broken_now = rows[~res.robust]
                x_best[broken_now] = res.x_adv[~res.robust]
                alive[rows] = res.robust
        clean += int(clean_b.sum())
        robust += int(alive.sum())
        robust_mask[s : s + len(yb)] = alive.cpu()
        clean_mask[s : s + len(yb)] = clean_b.cpu()
        x_adv_all[s : s + len(yb)] = x_best.cpu()
        bar.update(len(yb))
        done = s + len(yb)
        bar.set_postfix(clean=f"{_pct(clean, done):.1f}", robust=f"{_pct(robust, done):.1f}")
    bar.close()
    # ---- issue 5 (torchrun): counts and per-example results of all processes ----
    tot, whole = distributed.combine_eval(
        {"clean": clean, "robust": robust, "passes": passes},
        {"robust": robust_mask, "clean": clean_mask, "x_adv": x_adv_all},
        starts,
        batch_size,
    )
    clean, robust, passes = int(tot["clean"]), int(tot["robust"]), int(tot["passes"])
    robust_mask, clean_mask, x_adv_all = whole["robust"], whole["clean"], whole["x_adv"]
    # ---- end issue 5 ----
    n = len(y)
    full_cost = n * (1 + max(targeted, 1) * restarts * (steps + 1))
    return {
        "clean_acc": _pct(clean, n),
        "robust_acc": _pct(robust, n),
        "n": n,
        "robust_mask": robust_mask,
        "clean_mask": clean_mask,
        "x_adv": x_adv_all,
        "attack_passes": passes,
        "attack_passes_without_early_stop": full_cost,
        "seconds": time.perf_counter() - t0,
        "attack": {
            "name": f"PGD-{steps}",
            "norm": "Linf",
            "eps": eps,
            "step_size": step_size,
            "steps": steps,
            "restarts": restarts,
            "loss": loss,
            "targeted": targeted,
            "start": "uniform",
            "worst_case_over_restarts": True,
            "early_stop": early_stop,
            "precision": precision,
            "verdicts": "fp32, on the model",
            "gradients": _describe_gradients(model, steer, precision),
            "seed": seed,
        },
    }


def gradients_label(model: nn.Module, fold_bn: bool | None = None, precision: str = "fp32") -> str:
    """What an attack on ``model`` takes its gradients from (the ``attack.gradients`` entry)."""
    precision, _, steer = _search(model, fold_bn, precision)
    return _describe_gradients(model, steer, precision)


def _describe_gradients(model: nn.Module, steer: nn.Module, precision: str) -> str:
    where = "model" if steer is model else "model with BN folded into the convs, channels_last"
    if precision != "fp32":
        return f"{where}, in {precision} (verdicts from the model in fp32)"
    return where if where == "model" else f"{where} (verdicts from the model)"


def pgd_result(out: dict[str, Any]) -> dict[str, Any]:
    """The JSON part of a ``robust_accuracy`` result (no tensors)."""
    keep = ("robust_acc", "clean_acc", "n", "attack", "attack_passes")
    res = {k: out[k] for k in keep}
    res["attack_passes_without_early_stop"] = out["attack_passes_without_early_stop"]
    res["seconds"] = round(out["seconds"], 3)
    res["robust_examples"] = out["robust_mask"].nonzero().squeeze(1).tolist()
    return res


def fgsm_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, batch_size: int = 256
) -> dict[str, Any]:
    device = _device(model)
    robust = 0
    for s in range(0, len(y), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        xa = fgsm(model, xb, yb, eps)
        with torch.no_grad(), eval_mode(model):
            robust += int(((model(xb).argmax(1) == yb) & (model(xa).argmax(1) == yb)).sum())
    return {
        "robust_acc": _pct(robust, len(y)),
        "n": len(y),
        "attack": {"name": "FGSM", "norm": "Linf", "eps": eps, "loss": "ce", "start": "zero"},
    }


def autoattack_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    seed: int = 0,
    batch_size: int = 256,
    square_queries: int | None = None,
    progress: bool = False,
    fold_bn: bool | None = None,
) -> dict[str, Any]:
    """Standard AutoAttack; the attacks query :func:`actrain.runtime.gradient_model`
    (``fold_bn``) in fp32, every verdict comes from ``model``. No bf16 here: its attacks
    compare scores, and rounded scores made Square weaker (docs/evaluation.md)."""
    device = _device(model)
    t0 = time.perf_counter()
    steer = gradient_model(model, fold_bn)
    bars: dict[str, tqdm] = {}
    state = {"broken": 0}

    def on_batch(name: str, done: int, broken: int) -> None:
        if name not in bars:
            for b in bars.values():
                b.close()
            bars[name] = _bar(0, f"AutoAttack {name}", progress)
        state["broken"] += broken
        bar = bars[name]
        bar.n = done
        bar.set_postfix(broken_total=state["broken"])
        bar.refresh()

    res = autoattack(
        model,
        x.to(device),
        y.to(device),
        eps,
        seed=seed,
        batch_size=batch_size,
        square_queries=square_queries,
        on_batch=on_batch,
        searcher=steer,
    )
    for b in bars.values():
        b.close()
    n = len(y)
    return {
        "robust_acc": _pct(res.robust.sum(), n),
        "clean_acc": _pct(res.clean_correct.sum(), n),
        "n": n,
        "robust_acc_after": {k: _pct(v, n) for k, v in res.robust_after.items()},
        "flags": res.flags,
        "robust_examples": res.robust.nonzero().squeeze(1).cpu().tolist(),
        "seconds": round(time.perf_counter() - t0, 3),
        "attack": {
            "name": "AutoAttack",
            "implementation": "pyautoattack==0.2.0 (reference code of fra31/auto-attack)",
            "version": "standard" if square_queries in (None, 5000) else "custom",
            "attacks": list(STANDARD_ATTACKS),
            "norm": "Linf",
            "eps": eps,
            "apgd_iterations": 100,
            "apgd_t_target_classes": 9,
            "fab_t_target_classes": 9,
            "square_queries": square_queries or 5000,
            "gradients": _describe_gradients(model, steer, "fp32"),
            "seed": seed,
        },
        "_mask": res.robust.cpu(),
    }


def square_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    queries: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    fold_bn: bool | None = None,
) -> dict[str, Any]:
    """Square alone (the black-box baseline); fp32 scores, as in :func:`autoattack_accuracy`."""
    device = _device(model)
    t0 = time.perf_counter()
    steer = gradient_model(model, fold_bn)
    bar = _bar(len(y), f"Square-{queries}", progress)
    res = square_attack(
        model,
        x.to(device),
        y.to(device),
        eps,
        queries=queries,
        seed=seed,
        batch_size=batch_size,
        on_batch=lambda _n, done, _b: (setattr(bar, "n", done), bar.refresh()),
        searcher=steer,
    )
    bar.close()
    n = len(y)
    return {
        "robust_acc": _pct(res.robust.sum(), n),
        "n": n,
        "seconds": round(time.perf_counter() - t0, 3),
        "attack": {
            "name": "Square",
            "implementation": "pyautoattack==0.2.0 SquareAttack",
            "norm": "Linf",
            "eps": eps,
            "queries": queries,
            "p_init": 0.8,
            "loss": "margin",
            "queries_to": _describe_gradients(model, steer, "fp32"),
            "seed": seed,
        },
    }


def _summarise_min_pert(res: MinPerturbation) -> dict[str, Any]:
    correct = res.clean_correct.cpu()
    found = res.found.cpu()
    dist = res.distance.cpu()
    finite = dist[found]
    return {
        "mean": float(finite.mean()) if finite.numel() else float("nan"),
        "median": float(finite.median()) if finite.numel() else float("nan"),
        "n_correct": int(correct.sum()),
        "n_found": int(found.sum()),
        "n_not_found": int((correct & ~found).sum()),
        "forward_passes": res.forward_passes,
        "per_example": [float(d) if math.isfinite(d) else None for d in dist.tolist()],
    }


def _merge_known(
    model: nn.Module, x: Tensor, y: Tensor, known: Tensor, start: MinPerturbation | None
) -> MinPerturbation:
    """``start`` improved by every example of ``known`` that fools the model from closer."""
    with torch.no_grad(), eval_mode(model):
        correct = model(x).argmax(1) == y
        fools = correct & (model(known).argmax(1) != y)
    dist = linf_distance(known, x).float()
    if start is None:
        start = MinPerturbation(
            correct,
            torch.zeros_like(correct),
            torch.full_like(dist, math.inf),
            x.clone(),
            0,
        )
    better = fools & (~start.found | (dist < start.distance))
    distance = torch.where(better, dist, start.distance)
    x_adv = torch.where(better.view(-1, *([1] * (x.dim() - 1))), known, start.x_adv)
    return MinPerturbation(
        start.clean_correct, start.found | better, distance, x_adv, start.forward_passes
    )


def minimum_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    methods: Sequence[str] = ("fgsm-k", "pgd-search"),
    max_eps: float = 1.0,
    num_eps: int = 1000,
    pgd_steps: int = 20,
    search_steps: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    keep_examples: bool = False,
    known_adv: Tensor | None = None,
    fold_bn: bool | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Mean minimum L-infinity perturbation over clean-correct examples, per method.

    The PGD search starts from the closest adversarial example already known: the FGSM^k one
    when both run, and any of ``known_adv`` (e.g. the white-box PGD examples, same shape as x)
    that fools the model. So its distance is never above that of any attack found before.
    """
    _check_data(x, y)
    unknown = [m for m in methods if m not in ("fgsm-k", "pgd-search")]
    if unknown or not methods:
        raise ValueError(f"methods: fgsm-k and/or pgd-search, got {list(methods)}")
    device = _device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    precision, autocast, steer = _search(model, fold_bn, precision)
    out: dict[str, Any] = {}
    parts: dict[str, list[MinPerturbation]] = {m: [] for m in methods}
    bar = _bar(len(y), "min-perturbation", progress)
    t0 = time.perf_counter()
    for s in range(0, len(y), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        fk = None
        if "fgsm-k" in methods:
            fk = fgsm_k_minimum_perturbation(model, xb, yb, max_eps=max_eps, num_eps=num_eps)
            parts["fgsm-k"].append(fk)
        if "pgd-search" in methods:
            start = fk
            if known_adv is not None:
                start = _merge_known(model, xb, yb, known_adv[s : s + batch_size].to(device), fk)
            parts["pgd-search"].append(
                pgd_search_minimum_perturbation(
                    model,
                    xb,
                    yb,
                    start=start,
                    max_eps=max_eps,
                    steps=pgd_steps,
                    search_steps=search_steps,
                    generator=gen,
                    autocast=autocast,
                    gradient_model=steer,
                    verdict_autocast=contextlib.nullcontext,
                )
            )
        bar.update(len(yb))
        found = [p[-1].distance[p[-1].found] for p in parts.values()]
        if found and found[-1].numel():
            bar.set_postfix(mean=f"{float(torch.cat([found[-1]]).mean()):.4f}")
    bar.close()
    for m, chunks in parts.items():
        merged = MinPerturbation(
            torch.cat([c.clean_correct for c in chunks]),
            torch.cat([c.found for c in chunks]),
            torch.cat([c.distance for c in chunks]),
            torch.cat([c.x_adv.cpu() for c in chunks]),
            sum(c.forward_passes for c in chunks),
        )
        out[m] = _summarise_min_pert(merged)
        if keep_examples:
            out[m]["_x_adv"] = merged.x_adv
    settings: dict[str, Any] = {"norm": "Linf", "max_eps": max_eps}
    if "fgsm-k" in methods:
        settings["fgsm-k"] = {
            "as": "foolbox FGSM(epsilons=1000, max_epsilon=1): sign of the CE gradient at x",
            "num_eps": num_eps,
            "refine_first": 20,
        }
    if "pgd-search" in methods:
        settings["pgd-search"] = {
            "probe": f"PGD-{pgd_steps}, CE, uniform start, step 2.5*eps/{pgd_steps}",
            "bisection_steps": search_steps,
            "gradients": _describe_gradients(model, steer, precision),
            "initial_upper_bound": (
                "closest of FGSM^k and the white-box PGD examples"
                if known_adv is not None
                else ("FGSM^k distance" if "fgsm-k" in methods else "max_eps")
            ),
            "seed": seed,
        }
    out["attack"] = settings
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def sweep_step_size(eps: float, steps: int, base: float) -> float:
    """Evaluation step (0.003) unless the ball is too large for k steps to cross it."""
    return max(base, 2.5 * eps / max(steps, 1))


def eps_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps_255: Sequence[float] = PAPER_EPS_SWEEP,
    steps: int = 100,
    restarts: int = 1,
    step_size: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    fold_bn: bool | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """PGD-k accuracy at each eps (units of 1/255), as in the paper's Table 5; rows in
    increasing eps (the sanity checks read them so)."""
    bad = [e for e in eps_255 if not 0 <= float(e) <= 255]
    if bad:
        raise ValueError(f"eps_255: values must lie in [0, 255] (units of 1/255), got {bad}")
    step_size = PAPER_STEP_SIZE if step_size is None else step_size
    rows = []
    for e in sorted(set(eps_255), key=float):
        eps = float(e) / 255
        step = sweep_step_size(eps, steps, step_size)
        r = robust_accuracy(
            model,
            x,
            y,
            eps=eps,
            step_size=step,
            steps=steps,
            restarts=restarts,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            fold_bn=fold_bn,
            precision=precision,
        )
        rows.append({"eps_255": e, "eps": eps, "robust_acc": r["robust_acc"], "step_size": step})
    return {
        "rows": rows,
        "attack": {
            "name": f"PGD-{steps}",
            "norm": "Linf",
            "steps": steps,
            "restarts": restarts,
            "loss": "ce",
            "start": "uniform",
            "step_size_rule": f"max({step_size}, 2.5*eps/{steps})",
            "precision": precision,
            "gradients": gradients_label(model, fold_bn, precision),
            "seed": seed,
        },
    }


def transfer_examples(
    surrogate: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float | None = None,
    steps: int = 20,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    fold_bn: bool | None = None,
    precision: str = "fp32",
) -> Tensor:
    """PGD-k adversarial examples made on the surrogate (final iterate, one uniform start;
    gradients from :func:`actrain.runtime.gradient_model`; step: :func:`pgd_step_size`)."""
    step_size = pgd_step_size(eps, steps, step_size)
    device = _device(surrogate)
    _, autocast, steer = _search(surrogate, fold_bn, precision)
    gen = torch.Generator(device=device).manual_seed(seed)
    threat = LinfBall(eps, step_size)
    out = torch.empty_like(x, device="cpu")
    bar = _bar(len(y), f"transfer PGD-{steps}", progress)
    for s in range(0, len(y), batch_size):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        out[s : s + len(yb)] = pgd(
            steer, xb, eval_objective("ce", yb), threat, steps, "uniform", autocast, gen
        ).cpu()
        bar.update(len(yb))
    bar.close()
    return out


def transfer_success(
    target: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, batch_size: int = 256
) -> dict[str, Any]:
    """Success rate (percent of examples misclassified on the transferred images) and the
    rate among examples the target classified correctly when clean. ``robust_acc`` counts an
    example as white-box PGD does (correct clean and on the transferred image), so the sanity
    checks compare like with like; ``target_acc`` also counts a misclassified image the
    perturbation happened to put right."""
    clean_ok = predict(target, x, batch_size) == y.cpu()
    adv_ok = predict(target, x_adv, batch_size) == y.cpu()
    n = len(y)
    return {
        "success_rate": _pct((~adv_ok).sum(), n),
        "target_acc": _pct(adv_ok.sum(), n),
        "robust_acc": _pct((clean_ok & adv_ok).sum(), n),
        "success_rate_on_clean_correct": _pct((clean_ok & ~adv_ok).sum(), int(clean_ok.sum())),
        "n": n,
    }
