"""torch.distributed for ``actrain`` under ``torchrun``: start-up, rank helpers, reductions.

Without torchrun's environment (``RANK``/``WORLD_SIZE``) nothing here does anything and every
helper answers as a single process would, so the single-process code path is unchanged.

Contract (see docs/distributed.md): ``--batch-size`` is per process; every process visits a
strided shard of the same seeded (seed, epoch) permutation, so N processes with batch B see,
step by step, exactly the examples one process with batch N*B sees. Gradients are averaged by
DistributedDataParallel; with ``--sync-bn`` batch-norm statistics are those of the global batch,
so N x B and 1 x N*B runs compute the same update (to float rounding) when the attack start is
deterministic (``--attack-start zero``). Random attack starts are drawn by each process for its
own shard, so with them the runs agree in distribution only.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
ELASTIC_MARKER = ".torchelastic_run_id"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


SINGLE = DistInfo()


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def _env_int(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        from actrain.errors import UsageError

        raise UsageError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from None


def env_info() -> DistInfo:
    """Rank and world size from the environment (no process group is created)."""
    if not launched():
        return SINGLE
    return DistInfo(_env_int("RANK"), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK"))


def info() -> DistInfo:
    """The current process's place in the job (``SINGLE`` when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK"), dist.get_backend()
    )


def device_name(requested: str) -> str:
    """The device this process should use: under torchrun, CUDA means ``cuda:LOCAL_RANK``."""
    env = env_info()
    if not launched() or requested == "cpu" or requested.startswith("cuda:"):
        return requested
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return f"cuda:{env.local_rank}"
    return requested


def init(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (NCCL for CUDA, gloo otherwise); a no-op outside torchrun."""
    import torch.distributed as dist

    if not launched():
        return SINGLE
    if dist.is_initialized():
        return info()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kw["device_id"] = device
    attempt = restart_count()
    if attempt > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The agent's store outlives a restart and still holds the dead workers' addresses
        # under the same keys: a new worker could read one and connect to a process that is
        # gone. Keys of this attempt get their own prefix.
        d = env_info()
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            d.world_size,
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
        )
        kw |= {
            "store": dist.PrefixStore(f"actrain/attempt_{attempt}", store),
            "rank": d.rank,
            "world_size": d.world_size,
        }
    dist.init_process_group(**kw)
    return info()


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            # every rank has finished talking before any tears its group down (a restarted
            # gloo worker aborted once in a test when its peer had already gone)
            dist.barrier()
            dist.destroy_process_group()


def leave(rc: int) -> NoReturn:
    """End a torchrun worker with exit code ``rc`` once its work and files are done, skipping
    the interpreter's teardown: there, with the process group gone, gloo's C++ objects were
    destroyed in an order that now and then aborted a finished worker ("terminate called
    without an active exception", SIGABRT with no Python frame; about 1 run in 20 of a
    2-process CPU training under load), and torchrun reported the whole job failed."""
    if rc == 0:
        cleanup()  # every rank done talking (a failed rank's peers may be stuck: not waited)
    gc.collect()  # DataLoader iterators shut their workers down
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


def barrier() -> None:
    if info().enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum or max) of ``t``; unchanged when not distributed."""
    if not info().enabled:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def reduce_sums(values: dict[str, float | int | Tensor], device: torch.device) -> dict[str, float]:
    """Sum each named number over all processes (in float64); every rank gets the totals."""
    keys = list(values)
    if not keys:
        return {}
    t = torch.tensor(
        [
            float(v.detach().double().item()) if isinstance(v, Tensor) else float(v)
            for v in values.values()
        ],
        dtype=torch.float64,
        device=device,
    )
    all_reduce_(t)
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not info().enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank ([obj] when not distributed)."""
    if not info().enabled:
        return [obj]
    import torch.distributed as dist

    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (batch-norm running statistics) equal to rank ``src``'s."""
    if not info().enabled:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, src=src)


def shard_starts(n: int, batch_size: int) -> list[int]:
    """Start offsets of the batches of ``range(n)`` this rank handles: batch k goes to rank
    k mod world_size, so the batches (and whatever is seeded per batch) do not depend on it."""
    d = info()
    return list(range(d.rank * batch_size, n, d.world_size * batch_size))


# ---- batch norm synchronised across processes -----------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """All-reduce whose backward all-reduces the gradient (the sum's adjoint)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class PortableSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised batch norm for CPU (gloo) processes, where torch's SyncBatchNorm refuses
    to run (and DistributedDataParallel refuses models holding it).

    In training, the per-channel mean and variance are those of the global batch: one
    all-reduce of (count, sum, sum of squares), accumulated in float64, per layer and
    differentiable, so gradients are those of batch norm over the global batch. Eval mode and
    single-process runs use plain batch norm. CUDA models get torch's SyncBatchNorm instead
    (see :func:`convert_sync_batchnorm`).
    """

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        if not (self.training and info().enabled):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        count = input.numel() // input.shape[1]
        x64 = input.double()
        local = torch.cat(
            [
                torch.full((1,), float(count), dtype=torch.float64, device=input.device),
                x64.sum(dims),
                (x64 * x64).sum(dims),
            ]
        )
        total = _AllReduceSum.apply(local)
        c = total[0].detach()
        mean = total[1 : 1 + input.shape[1]] / c
        var = (total[1 + input.shape[1] :] / c - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * (c / (c - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, -1] + [1] * (input.dim() - 2)
        invstd = torch.rsqrt(var + self.eps)
        out = (x64 - mean.view(shape)) * invstd.view(shape)
        if self.affine:
            out = out * self.weight.double().view(shape) + self.bias.double().view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d of ``model`` synchronised across processes: torch's SyncBatchNorm on
    CUDA, :class:`PortableSyncBatchNorm` elsewhere. Both share the original tensors and keep
    the state-dict keys, so checkpoints and weights stay interchangeable with plain models."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_portable(model)


def _convert_portable(model: nn.Module) -> nn.Module:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for name, child in list(model.named_children()):
        if isinstance(child, bn_types) and not isinstance(child, PortableSyncBatchNorm):
            new = PortableSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean = child.running_mean
                new.running_var = child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            _convert_portable(child)
    return model


# ---- torchrun restarts and failures ---------------------------------------------------------


def restart_count() -> int:
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) if launched() else 0


def elastic_run_id() -> str | None:
    return os.environ.get("TORCHELASTIC_RUN_ID") if launched() else None


def mark_run_dir(run_dir: Path) -> None:
    """Record which torchrun job owns ``run_dir`` (rank 0), so its restarts may resume it."""
    rid = elastic_run_id()
    if rid:
        (Path(run_dir) / ELASTIC_MARKER).write_text(rid)


def restart_plan(run_dir: Path | None) -> str | None:
    """After ``torchrun --max-restarts`` restarted this job: ``"resume"`` when ``run_dir`` holds
    a checkpoint of this same job, ``"overwrite"`` when this job created it but died before
    the first checkpoint, None otherwise (a first attempt, or a folder of another job)."""
    if run_dir is None or restart_count() == 0:
        return None
    marker = Path(run_dir) / ELASTIC_MARKER
    try:
        owner = marker.read_text().strip()
    except OSError:
        return None
    if owner != elastic_run_id():
        return None
    return "resume" if (Path(run_dir) / "checkpoint.pt").is_file() else "overwrite"


def _fault_plan() -> tuple[int, int] | None:
    spec = os.environ.get("ACTRAIN_FAULT_AT")  # "RANK:STEP", for the tests of issue 5
    if not spec:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


_FAULT = _fault_plan()


def inject_fault(step: int) -> None:
    """Test hook: with ACTRAIN_FAULT_AT=RANK:STEP, that rank fails after that global step, in
    the first attempt of a torchrun job only (so a restart can succeed)."""
    if _FAULT is not None and (env_info().rank, step) == _FAULT and restart_count() == 0:
        raise RuntimeError(f"injected failure after step {step} (ACTRAIN_FAULT_AT)")


def describe_failure(exc: BaseException) -> str:
    """One line for a worker that fails, naming its rank and what probably happened."""
    d = env_info()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lost = ("connection closed", "connection reset", "broken pipe", "timed out", "peer")
    if any(s in text.lower() for s in lost):
        text = (
            f"lost contact with another process ({text}); a peer rank probably failed first,"
            " see its message"
        )
    return f"rank {d.rank}/{d.world_size} (local rank {d.local_rank}) failed: {text}"


def report_failure(exc: BaseException) -> None:
    print(f"actrain: {describe_failure(exc)}", file=sys.stderr, flush=True)


# ---- evaluation split over processes ------------------------------------------------------------


def batch_generator(device: torch.device, seed: int, start: int) -> torch.Generator:
    """The random-start generator of the evaluation batch at offset ``start``: the first batch
    keeps ``seed`` itself, later ones get seeds derived from (seed, start). Per-batch streams
    make the numbers independent of which process evaluates which batch."""
    from actrain.data.sampling import mix_seed

    return torch.Generator(device=device).manual_seed(seed if start == 0 else mix_seed(seed, start))


def combine_eval(
    counts: dict[str, int | float], tensors: dict[str, Tensor], starts: list[int], batch_size: int
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Under torchrun: sum the counts, and assemble the per-example tensors (first dimension =
    examples) from the rows each process filled (its batches ``starts``); rank 0 and every other
    process get the whole-set results. Unchanged when not distributed."""
    d = info()
    if not d.enabled:
        return {k: float(v) for k, v in counts.items()}, tensors
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if d.backend == "nccl" else None
    totals = reduce_sums(dict(counts), device or torch.device("cpu"))
    out = {}
    for name, t in tensors.items():
        mine = torch.zeros(t.shape[0], dtype=torch.bool)
        for s in starts:
            mine[s : s + batch_size] = True
        work = t.to(device) if device is not None else t.clone()
        is_bool = work.dtype == torch.bool
        work = work.to(torch.uint8) if is_bool else work
        work[~mine.to(work.device)] = 0
        dist.all_reduce(work)
        out[name] = (work.bool() if is_bool else work).to(t.device)
    return totals, out


def eval_setup(ns: Any) -> Any:
    """``actrain eval`` under torchrun: join the group with this process's device; on ranks
    other than 0 print nothing and write no file (rank 0 reports for the whole test set)."""
    if not launched():
        return ns
    name = device_name(getattr(ns, "device", "auto"))
    from actrain.runtime import resolve_device

    init(resolve_device(name))
    ns.device = name
    if not info().is_main:
        ns.progress = False
        for attr in ("json", "markdown", "out", "save_examples"):
            if hasattr(ns, attr):
                setattr(ns, attr, None)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return ns
