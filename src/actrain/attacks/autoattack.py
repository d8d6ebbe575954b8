"""AutoAttack (Croce & Hein, 2020), standard version, through the ``pyautoattack`` package.

``pyautoattack`` is the reference implementation (fra31/auto-attack) packaged on PyPI. We
build its ``AutoAttack(version="standard")`` object, so every attack carries the standard
settings (APGD-CE 100 iterations, APGD-T 9 target classes x 100 iterations, FAB-T 9 target
classes, Square 5000 queries), and run its four attacks in the standard cascade ourselves:
each attack only sees the examples every earlier attack failed on, exactly as
``run_standard_evaluation`` does. Running the cascade here gives per-attack robust accuracy,
progress per batch and the library's own warnings (zero gradients, randomness, Square beating
the gradient attacks) as flags in the result.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from actrain.attacks.base import eval_mode

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass
class AutoAttackResult:
    clean_correct: Tensor  # bool [N]
    robust: Tensor  # bool [N]: correct after every attack of the cascade
    x_adv: Tensor
    robust_after: dict[str, int]  # attack -> number of examples still robust after it
    broken_by: Tensor  # int [N]: index in ``attacks`` of the attack that broke it, -1 if none
    attacks: list[str]
    flags: list[str] = field(default_factory=list)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _import_pyautoattack():
    try:
        import pyautoattack
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ImportError(
            "AutoAttack needs the 'pyautoattack' package: pip install pyautoattack==0.2.0"
        ) from exc
    return pyautoattack


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    attacks: tuple[str, ...] = STANDARD_ATTACKS,
    seed: int = 0,
    batch_size: int = 256,
    square_queries: int | None = None,
    on_batch: Callable[[str, int, int], None] | None = None,
    searcher: nn.Module | None = None,
) -> AutoAttackResult:
    """Standard AutoAttack (L-infinity) on tensors in [0, 1] on the model's device.

    ``on_batch(attack, done, broken)`` is called after every batch of every attack.
    ``square_queries`` overrides Square's 5000 queries (then the run is no longer "standard").
    ``searcher`` (e.g. :func:`actrain.runtime.gradient_model`) is what the attacks query and
    differentiate; whether an example is broken is always decided on ``model``.
    """
    paa = _import_pyautoattack()
    device = x.device
    logger = logging.getLogger("auto-attack")
    capture = _Capture()
    logger.addHandler(capture)
    flags: list[str] = []
    try:
        search = model if searcher is None else searcher
        with (
            _own_rng(device),
            eval_mode(model),
            eval_mode(search),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            aa = paa.AutoAttack(search, eps=eps, version="standard", seed=seed, device=device)
            aa.logger = logger
            for sub in (aa.apgd, aa.apgd_targeted, aa.fab, aa.square):
                if hasattr(sub, "logger"):
                    sub.logger = logger
            if square_queries is not None:
                aa.square.n_queries = square_queries
            if len(y):
                _defence_checks(paa, aa, model, x[:batch_size], y[:batch_size], attacks, logger)
            with torch.no_grad():
                pred = torch.cat(
                    [model(x[s : s + batch_size]).argmax(1) for s in range(0, len(y), batch_size)]
                )
            clean_correct = pred == y
            robust = clean_correct.clone()
            broken_by = torch.full_like(y, -1)
            x_adv = x.clone()
            robust_after: dict[str, int] = {}
            for a_i, name in enumerate(attacks):
                idx = robust.nonzero().squeeze(1)
                done = 0
                for s in range(0, idx.numel(), batch_size):
                    rows = idx[s : s + batch_size]
                    adv = _run_one(aa, name, x[rows], y[rows], seed)
                    with torch.no_grad():
                        fooled = model(adv).argmax(1) != y[rows]
                    robust[rows[fooled]] = False
                    broken_by[rows[fooled]] = a_i
                    x_adv[rows[fooled]] = adv[fooled].to(x_adv.dtype)
                    done += rows.numel()
                    if on_batch is not None:
                        on_batch(name, done, int(fooled.sum()))
                robust_after[name] = int(robust.sum())
        flags += [str(w.message) for w in caught]
    finally:
        logger.removeHandler(capture)
    flags += capture.messages
    # The library's own final check: Square succeeding where the gradient attacks failed.
    if "square" in robust_after and len(robust_after) > 1:
        before = list(robust_after.values())[-2]
        if robust_after["square"] < before:
            flags.append(
                f"Square (black-box) broke {before - robust_after['square']} examples the "
                "gradient attacks could not: possible gradient masking"
            )
    return AutoAttackResult(
        clean_correct, robust, x_adv, robust_after, broken_by, list(attacks), sorted(set(flags))
    )


def _own_rng(device: torch.device):
    """The reference code seeds torch's global generators (``manual_seed`` in every attack):
    the caller's random state is put back afterwards, as actrain's own attacks leave it."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=device.type)


def _defence_checks(paa, aa, model: nn.Module, x: Tensor, y: Tensor, attacks, logger) -> None:
    """The reference code's checks of what kind of defence it faces (randomised, probabilities
    instead of logits, a forward that differentiates, too few classes), on the model itself
    (the gradient copy is deterministic whatever the model does), as
    ``run_standard_evaluation`` runs them on its first batch."""
    checks = paa.checks
    checks.check_randomized(model, x, y, bs=len(y), logger=logger)
    n_cls = checks.check_range_output(model, x, logger=logger)
    for k in checks.funcs:  # the library's call counters are module-wide: from zero each time
        checks.funcs[k] = 0
    tracer = sys.gettrace()  # (it traces the forward, then clears any tracer: a debugger's)
    try:
        checks.check_dynamic(model, x, False, logger=logger)
    finally:
        sys.settrace(tracer)
    checks.check_n_classes(
        n_cls, list(attacks), aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes, logger
    )


def _run_one(aa, name: str, x: Tensor, y: Tensor, seed: int) -> Tensor:
    if name == "apgd-ce":
        aa.apgd.loss = "ce"
        aa.apgd.seed = seed
        return aa.apgd.perturb(x, y)
    if name == "apgd-dlr":
        aa.apgd.loss = "dlr"
        aa.apgd.seed = seed
        return aa.apgd.perturb(x, y)
    if name == "apgd-t":
        aa.apgd_targeted.seed = seed
        return aa.apgd_targeted.perturb(x, y)
    if name in ("fab", "fab-t"):
        aa.fab.targeted = name == "fab-t"
        aa.fab.n_restarts = 1
        aa.fab.seed = seed
        return aa.fab.perturb(x, y)
    if name == "square":
        aa.square.seed = seed
        return aa.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack attack {name!r} ({', '.join(STANDARD_ATTACKS)})")


def square_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    queries: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    on_batch: Callable[[str, int, int], None] | None = None,
    searcher: nn.Module | None = None,
) -> AutoAttackResult:
    """Square attack alone on every example: a score-based black-box baseline (queries to
    ``searcher`` if given, verdicts from ``model``, as in :func:`autoattack`)."""
    paa = _import_pyautoattack()
    from pyautoattack.square import SquareAttack

    del paa
    search = model if searcher is None else searcher
    with _own_rng(x.device), eval_mode(model), eval_mode(search):
        sq = SquareAttack(
            search,
            p_init=0.8,
            n_queries=queries,
            eps=eps,
            norm="Linf",
            n_restarts=1,
            seed=seed,
            verbose=False,
            device=x.device,
            resc_schedule=False,
        )
        with torch.no_grad():
            clean_correct = (
                torch.cat(
                    [model(x[s : s + batch_size]).argmax(1) for s in range(0, len(y), batch_size)]
                )
                == y
            )
        robust = clean_correct.clone()
        x_adv = x.clone()
        idx = robust.nonzero().squeeze(1)
        done = 0
        for s in range(0, idx.numel(), batch_size):
            rows = idx[s : s + batch_size]
            adv = sq.perturb(x[rows], y[rows])
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[rows]
            robust[rows[fooled]] = False
            x_adv[rows[fooled]] = adv[fooled].to(x_adv.dtype)
            done += rows.numel()
            if on_batch is not None:
                on_batch("square", done, int(fooled.sum()))
    broken_by = torch.where(clean_correct & ~robust, 0, -1)
    return AutoAttackResult(
        clean_correct, robust, x_adv, {"square": int(robust.sum())}, broken_by, ["square"]
    )
