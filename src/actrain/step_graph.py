"""A whole training update, up to its gradients, replayed from one CUDA graph (issue 7).

With the attack alone graphed (actrain.attacks.graphed), an ACT step on an H200 at batch 128
still spent 10-11 ms in each of G's and F's train-mode passes, against 1.7 ms for a graphed
attack pass: the same launch overhead, now in the passes ACT has and Madry does not. Here the
method's context (ACT: F(x), train mode), the K attack passes on G's BN-folded view (refolded
inside the graph from the current weights), the losses and the backward are captured once per
batch shape and replayed.

ACT's F(x) is needed only by the attack's loss and the losses: with ``model_streams`` F runs
on a second stream forked from the capture stream, so that its forward overlaps G's first
attack forward and its backward (autograd runs each backward op on its forward's stream)
overlaps G's on the GPU; the graph joins the streams before it ends, so what follows a replay
sees both gradients.

What stays eager, so that a graphed update is the eager update: the random start (drawn from
the generator the eager attack uses, before the replay), the finiteness check of the losses
(one synchronisation, as without graphs) and the optimiser steps with their learning rates.
The gradients live in the graph's memory; they are handed back to the parameters after every
replay, so code that set them to None in between (a benchmark's own passes) changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from actrain.attacks import Objective
from actrain.attacks.graphed import CaptureFailed, capture
from actrain.attacks.pgd import PGDTraining, pgd_steps
from actrain.runtime import attack_model, autocast_dtype

if TYPE_CHECKING:
    from actrain.train import Trainer

MAX_GRAPHS = 2  # the full batch and an epoch's last, smaller one


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    y: Tensor
    start: Tensor | None
    losses: dict[str, Tensor]
    logits: dict[str, Tensor]
    total: Tensor
    grads: list[tuple[torch.nn.Parameter, Tensor | None]]


def supported(trainer: Trainer) -> str | None:
    """Why the update of ``trainer`` cannot be graphed (None: it can)."""
    if trainer.device.type != "cuda":
        return "not a CUDA device"
    if trainer.dist.enabled:
        return "several processes (DDP's gradient hooks)"
    if trainer.scaler is not None:
        return "fp16 (the GradScaler's checks)"
    attack = trainer.train_attack
    if attack is not None and not isinstance(attack, PGDTraining):
        return f"--train-attack {attack.name}"
    return None


def _after(
    side: torch.cuda.Stream, main: torch.cuda.Stream, make: Callable[[], Objective]
) -> Objective:
    """The objective ``make()`` builds, built on ``main`` at its first call, once the work
    queued on ``side`` (F(x), which it reads) is done: before that, G's first attack forward
    runs beside F's."""
    built: list[Objective] = []

    def joined(logits: Tensor) -> Tensor:
        if not built:
            main.wait_stream(side)
            built.append(make())
        return built[0](logits)

    return joined


def model_streams_default(trainer: Trainer) -> bool:
    """``--model-streams`` as asked, else on for methods with two models (ACT)."""
    asked = trainer.cfg.model_streams
    return asked if asked is not None else len(trainer.method.roles) > 1


class GraphedUpdate:
    """``__call__(x, y)`` returns the update's (losses, logits, total) with every parameter's
    ``.grad`` holding this batch's gradient, as the eager forward and backward leave them."""

    def __init__(self, trainer: Trainer, model_streams: bool = False) -> None:
        self.trainer = trainer
        # the stream the method's context (ACT: F(x)) and so its backward run on
        self.side = torch.cuda.Stream(device=trainer.device) if model_streams else None
        self.graphs: dict[tuple, _Graph] = {}
        self.captures = 0
        dtype = autocast_dtype(trainer.precision)
        # Casts are not cached across the graph's passes: each pass casts the weights it reads
        self.autocast = (
            functools.partial(torch.autocast, "cuda", dtype=dtype, cache_enabled=False)
            if dtype is not None
            else trainer.autocast
        )

    def __call__(self, x: Tensor, y: Tensor) -> tuple[dict, dict, Tensor]:
        attack = self.trainer.train_attack
        attacks = attack is not None and attack.steps > 0
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape))
        entry = self.graphs.get(key)
        if entry is None:  # captured from any start in the ball: x itself
            entry = self._capture(x, y, x.detach().clone() if attacks else None)
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = entry
        entry.x.copy_(x)
        entry.y.copy_(y)
        if attacks:  # drawn eagerly, from the generator and in the order the eager attack uses
            entry.start.copy_(attack.threat.random_perturb(x.detach(), attack.start))
        entry.graph.replay()
        for p, g in entry.grads:
            p.grad = g
        losses = {r: v.clone() for r, v in entry.losses.items()}
        logits = {r: v.clone() for r, v in entry.logits.items()}
        return losses, logits, entry.total.clone()

    def _body(self, x: Tensor, y: Tensor, start: Tensor | None):
        t = self.trainer
        method, models, attack = t.method, t.models, t.train_attack
        for m in models.values():
            m.train()
        side, main = self.side, None
        if side is not None:  # fork: F's forward, and later its backward, beside G's
            main = torch.cuda.current_stream(t.device)
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else nullcontext(), self.autocast():
            ctx = method.prepare(models, x, y, attack is not None)
        x_adv = x
        if start is not None:
            g = attack_model(models["g"], t.fold_bn, t.precision)  # refolded in the graph
            make = functools.partial(t._attack_objective, ctx, y)
            # G's first attack forward runs beside F(x); the objective, which reads F(x) (and
            # may compute from it when built), is built once F(x) is there
            objective = make() if side is None else _after(side, main, make)
            x_adv = pgd_steps(g, x, start, objective, attack.threat, attack.steps, self.autocast)
        if side is not None:  # the losses read F(x)
            main.wait_stream(side)
        with self.autocast():
            out = method.losses(models, x, x_adv, y, ctx)
        total = sum(out.losses.values())
        total.backward()
        if side is not None:  # join: F's gradients before the graph ends
            main.wait_stream(side)
        return out, total

    def _capture(self, x: Tensor, y: Tensor, start: Tensor | None) -> _Graph:
        buffers = [b for m in self.trainer.models.values() for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            return self._capture_graph(x, y, start)
        except Exception as exc:
            for opt in self.trainer.optimizers.values():  # as an eager update would find them
                opt.zero_grad(set_to_none=True)
            raise CaptureFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:  # the warm-up passes must not count as training: BN statistics put back
            with torch.no_grad():
                for b, s in zip(buffers, saved, strict=True):
                    b.copy_(s)

    def _capture_graph(self, x: Tensor, y: Tensor, start: Tensor | None) -> _Graph:
        t = self.trainer
        sx, sy = x.detach().clone(), y.clone()
        sstart = start.clone() if start is not None else None
        params = [p for m in t.models.values() for p in m.parameters() if p.requires_grad]

        def drop_grads() -> None:  # the graph's backward allocates them in its own pool
            for opt in t.optimizers.values():
                opt.zero_grad(set_to_none=True)

        # warm-up passes: cuDNN's algorithm search, the attack view, the allocator
        graph, (out, total) = capture(lambda: self._body(sx, sy, sstart), x.device, drop_grads)
        self.captures += 1
        grads = [(p, p.grad) for p in params]
        # Outputs without their autograd graph: kept alive, it would hold the parameters'
        # gradient accumulators on the capture stream, which later eager backwards warn about
        losses = {r: v.detach() for r, v in out.losses.items()}
        logits = {r: v.detach() for r, v in out.logits.items()}
        return _Graph(graph, sx, sy, sstart, losses, logits, total.detach(), grads)
