"""PGD training attacks replayed from CUDA graphs.

At the paper's batch sizes a ResNet-18 attack pass on a large GPU is bound by kernel launches,
not arithmetic: on an H200, batch 128 and batch 512 ACT steps took 80 and 71 ms
(benchmarks/README.md), i.e. the GPU idled most of the step. The K passes of the training
attack are the same kernels on the same shapes every step, so they are captured once per
input shape as one CUDA graph and replayed: one launch instead of K x (forward + backward)
kernels' worth.

What changes between steps is copied into the graph's static inputs: the clean batch, the
labels, the method's context (ACT: F(x)), and the random start, which is drawn outside the
graph from the same generator the eager attack uses, so the graphed attack consumes random
numbers exactly as the eager one and finds the same x_adv. The model's weights (and the
BN-folded attack view's, refreshed in place) are read at their fixed addresses on every replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from actrain.attacks.base import Objective
from actrain.attacks.pgd import PGDTraining, pgd_steps

MAX_GRAPHS = 4  # shapes kept (full batches, the last partial batch, evaluation-sized probes)
T = TypeVar("T")


class CaptureFailed(RuntimeError):
    """Work could not be captured (an operation CUDA graphs do not allow, say); the trainer
    then goes on without graphs."""


def capture(
    run: Callable[[], T], device: torch.device, before: Callable[[], None] | None = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """``run`` as a CUDA graph, and its outputs (rewritten by every replay). Two warm-up calls
    on a side stream first (cuDNN's algorithm search, the allocator), as capture requires;
    ``before`` runs between them and the capture."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    if before is not None:
        before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    start: Tensor
    y: Tensor
    ctx: dict[str, Tensor]
    out: Tensor


class GraphedPGD:
    """Runs ``attack`` (PGD training) on CUDA by graph replay; ``__call__`` has the eager
    attack's result. ``make_objective(ctx, y)`` is the method's attack objective, rebuilt
    once over the graph's static tensors at capture."""

    def __init__(self, attack: PGDTraining) -> None:
        self.attack = attack
        self.graphs: dict[tuple, _Graph] = {}
        self.captures = 0  # how many graphs were captured (tests, benchmark)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        ctx: dict[str, Tensor],
        make_objective: Callable[[dict[str, Tensor], Tensor], Objective],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> Tensor:
        attack = self.attack
        if attack.steps == 0:
            return x
        key = (
            id(model),
            tuple(x.shape),
            x.stride(),
            x.dtype,
            tuple(y.shape),
            tuple((k, tuple(v.shape), v.stride(), v.dtype) for k, v in sorted(ctx.items())),
        )
        entry = self.graphs.get(key)
        if entry is None:
            try:  # captured from any start in the ball: x itself
                entry = self._capture(model, x, x.detach(), y, ctx, make_objective, autocast)
            except Exception as exc:  # the attack changes no state: nothing to put back
                raise CaptureFailed(f"{type(exc).__name__}: {exc}") from exc
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = entry
        entry.x.copy_(x)
        # drawn eagerly, from the generator and in the order the eager attack uses
        entry.start.copy_(attack.threat.random_perturb(x.detach(), attack.start))
        entry.y.copy_(y)
        for k, v in ctx.items():
            entry.ctx[k].copy_(v)
        entry.graph.replay()
        return entry.out.clone()  # the next replay overwrites entry.out

    def _capture(self, model, x, start, y, ctx, make_objective, autocast) -> _Graph:
        static_x, static_start, static_y = x.detach().clone(), start.clone(), y.clone()
        static_ctx = {k: v.detach().clone() for k, v in ctx.items()}
        attack = self.attack

        def run() -> Tensor:
            # built inside the graph: an objective that computes from the context when built
            # must follow each replay's context, not the capture's
            objective = make_objective(static_ctx, static_y)
            return pgd_steps(
                model, static_x, static_start, objective, attack.threat, attack.steps, autocast
            )

        graph, out = capture(run, x.device)
        self.captures += 1
        return _Graph(graph, static_x, static_start, static_y, static_ctx, out)
