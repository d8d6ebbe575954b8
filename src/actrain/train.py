"""The one training loop shared by every method.

A method (see :mod:`actrain.methods`) supplies its models' roles, the forward passes its
attack needs, the attack objective and its losses; this loop does data, attack, backward,
optimiser and scheduler steps, per-epoch evaluation, metrics, checkpoints and resume.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from actrain import data as D
from actrain import distributed, fused, step_graph
from actrain.attacks import LinfBall, Objective, PGDTraining, eval_mode, pgd_robustness
from actrain.attacks.graphed import CaptureFailed, GraphedPGD
from actrain.checkpoint import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RUN_FILES,
    SUPERSEDED,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from actrain.config import (
    WIDTH_ARCHES,
    ConfigError,
    TrainConfig,
    eval_step,
    is_run_config,
    overfit_guard_on,
    scheduled_epochs,
    scheduled_milestones,
)
from actrain.data.sampling import mix_seed, shard_size
from actrain.errors import EXIT_FAILED, EXIT_INTERRUPTED, TrainingStopped, UserError
from actrain.fused import fused_bn_ran, use_fused_bn
from actrain.guard import OverfitGuard
from actrain.im2col import use_im2col_convs
from actrain.malloc import malloc_in_use
from actrain.methods import Method, build_method, build_train_attack
from actrain.models import create_model
from actrain.outputs import live_progress
from actrain.runtime import (
    attack_model,
    autocast_factory,
    channels_last_fp32_hazard,
    cpu_has_amx,
    fp32_levers_pay,
    keep_freed_memory,
    resolve_device,
    resolve_precision,
    slow_bf16_note,
)
from actrain.step_graph import GraphedUpdate

EVAL_BATCH = 256
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
FP16_ATTACK_SCALE = 2.0**10  # power of two: exact in every precision


def model_kwargs(cfg: TrainConfig, role: str, info: D.DatasetInfo, num_classes: int) -> dict:
    arch = cfg.arch_f if (role == "f" and cfg.arch_f) else cfg.arch
    width = cfg.width_f if (role == "f" and cfg.width_f) else cfg.width
    kw: dict[str, Any] = {"num_classes": num_classes, "in_channels": info.in_channels}
    if width is not None and arch in WIDTH_ARCHES:
        kw["width"] = width
    if arch == "wideresnet":
        if cfg.depth is not None:
            kw["depth"] = cfg.depth
        if cfg.widen_factor is not None:
            kw["widen_factor"] = cfg.widen_factor
    return {"name": arch, **kw}


def rank0_first(load: Callable[[], Any]) -> Any:
    """``load()`` on rank 0 first, then on the other ranks (under torchrun): a data set that
    must be downloaded is fetched once, not by every process into the same files at once.
    Rank 0's failure reaches every rank as the same one-line error."""
    if not distributed.info().enabled:
        return load()
    if distributed.info().is_main:
        try:
            result = load()
        except Exception as exc:  # the others wait on this broadcast: never leave them hanging
            distributed.broadcast_object(str(exc).splitlines()[0] if str(exc) else repr(exc))
            raise
        distributed.broadcast_object(None)
        return result
    error = distributed.broadcast_object(None)
    if error is not None:
        raise D.DataError(error)
    return load()


def build_model(kw: dict, role: str, dataset: str) -> nn.Module:
    """``create_model(**kw)``; what the architecture refuses (a WideResNet depth that is not
    6n + 4, an RGB-only model on grey images) is the user's flag, named with its model."""
    try:
        return create_model(**kw)
    except ValueError as exc:
        flag = "--arch-f" if role == "f" else "--arch"
        raise ConfigError(
            f"{flag} {kw['name']} (model {role.upper()}) on {dataset}: {exc}"
        ) from None


def single_value_batch_norm(model: nn.Module, image: Tensor) -> str | None:
    """The first batch-norm layer to which a training batch of this one image would give one
    value per channel (PyTorch refuses to train on that, at the first step), or None."""
    found: list[str] = []

    def check(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not found and args[0][0].numel() <= args[0].shape[1]:
                found.append(name)

        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]
    handles = [m.register_forward_pre_hook(check(n)) for n, m in layers]
    try:
        with torch.no_grad(), eval_mode(model):
            model(image)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as plain tensors/values so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunData:
    info: D.DatasetInfo
    num_classes: int
    train: Any  # loader with __len__ and epoch(epoch, start_batch)
    eval_x: Tensor | None
    eval_y: Tensor | None
    eval_name: str
    classes: list[str] = field(default_factory=list)


def build_data(
    cfg: TrainConfig,
    device: torch.device,
    channels_last: bool,
    rank: int = 0,
    world_size: int = 1,
) -> RunData:
    """Training batches of this process's shard (``rank`` of ``world_size``; batch size per
    process) and the full evaluation set (every process holds it; evaluation splits it)."""
    info = D.get_dataset_info(cfg.dataset)
    if not info.in_memory:
        return build_folder_data(cfg, device, channels_last, rank, world_size)
    train = D.load_split(
        cfg.dataset,
        "train",
        cfg.data_dir,
        subset=cfg.train_subset,
        seed=cfg.seed,
        download=cfg.download,
        flag="--train-subset",
    )
    num_classes = len(train.classes)
    eval_name = "test"
    if cfg.val_size > 0:
        if cfg.val_size >= len(train.labels):
            raise ConfigError(
                f"--val-size: {cfg.val_size} leaves no training data ({len(train.labels)} images)"
            )
        train, evalset = D.train_val_split(train, cfg.val_size, seed=cfg.seed)
        eval_name = "val"
    else:
        evalset = D.load_split(
            cfg.dataset,
            "test",
            cfg.data_dir,
            subset=cfg.test_subset,
            seed=0,
            download=cfg.download,
            flag="--test-subset",
        )
    if cfg.eval_size and cfg.eval_size < len(evalset.labels):
        keep = D.balanced_subset_indices(evalset.labels, cfg.eval_size, seed=0)
        evalset = D.ImageTensors(
            evalset.images[keep], evalset.labels[keep], evalset.indices[keep], evalset.classes
        )
    # Every image each epoch, except a last batch of one image: batch norm cannot train on
    # it (PyTorch raises mid-epoch), so that one waits for the next epoch's shuffle.
    lone_last = shard_size(len(train.labels), world_size, False) % cfg.batch_size == 1
    loader = D.InMemoryLoader(
        train,
        cfg.batch_size,
        device=device,
        shuffle=True,
        augment=info.augment,
        drop_last=lone_last and cfg.batch_size > 1,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    if len(loader) == 0:  # a single training image (per process): nothing batch norm can train on
        n = len(train.labels)
        where = f" over {world_size} processes: one each" if world_size > 1 else ""
        raise ConfigError(
            f"training data: {n} image{'s' if n != 1 else ''}{where}, a batch of one, which"
            f" batch norm cannot train on; use at least {2 * world_size} training images"
            " (--train-subset, --val-size)"
        )
    ex = evalset.images.to(device).float().div_(255)
    if channels_last:
        ex = ex.contiguous(memory_format=torch.channels_last)
    return RunData(
        info, num_classes, loader, ex, evalset.labels.to(device), eval_name, classes=train.classes
    )


def build_folder_data(
    cfg: TrainConfig,
    device: torch.device,
    channels_last: bool,
    rank: int = 0,
    world_size: int = 1,
) -> RunData:
    """ImageNet-style folders: streamed training batches, a fixed balanced evaluation subset."""
    if cfg.data_dir is None:
        raise ConfigError("--data-dir: required for --dataset imagefolder (train/ and val/ inside)")
    train, evaluation = D.make_imagefolder_loaders(
        cfg.data_dir,
        cfg.batch_size,
        device=device,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    if len(train) == 0:
        n = train.num_examples
        where = f" over {world_size} processes: one each" if world_size > 1 else ""
        raise ConfigError(
            f"training data: {n} image{'s' if n != 1 else ''} in {cfg.data_dir}/train{where},"
            " a batch of one, which batch norm cannot train on; use at least"
            f" {2 * world_size} training images"
        )
    targets = torch.tensor(evaluation.folder.targets)
    keep = D.balanced_subset_indices(targets, cfg.eval_size or len(targets), seed=0)
    subset = D.decode_subset(evaluation, keep)
    ex = subset.images.to(device).float().div_(255)
    if channels_last:
        ex = ex.contiguous(memory_format=torch.channels_last)
    ey = subset.labels.to(device)
    info = D.get_dataset_info("imagefolder")
    return RunData(info, len(train.classes), train, ex, ey, "val", classes=train.classes)


@dataclass(frozen=True)
class _TorchFlags:
    """The process-wide torch settings a Trainer changes, saved so it can put them back."""

    deterministic: bool
    warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool

    @classmethod
    def current(cls) -> _TorchFlags:
        return cls(
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
        )

    def apply(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic


class Trainer:
    """Holds a run's state; ``fit`` runs the remaining epochs.

    The position in training is (epoch, batch): checkpoints can be taken between any two steps
    and resume continues from exactly there, with the partial epoch's metrics and every RNG.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path | str, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # Under torchrun (issue 5): this process's device and place in the job; SINGLE otherwise.
        self.device = resolve_device(distributed.device_name(cfg.device))
        if self.device.type == "cpu":
            keep_freed_memory()  # issue 7: no page faults re-reading freed activations
        self.dist = distributed.init(self.device, cfg.dist_backend)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        # Process-wide torch settings: the caller's are put back when fit() ends (or when this
        # constructor fails), so a library user's later code does not run under this run's.
        self._caller_flags = _TorchFlags.current()
        self._apply_torch_flags()
        try:
            self._setup(cfg, resume)
        except BaseException:
            self._caller_flags.apply()
            raise

    def _apply_torch_flags(self) -> None:
        """This run's process-wide torch settings (held from construction to the end of fit)."""
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN's fastest algorithms

    def _setup(self, cfg: TrainConfig, resume: bool) -> None:
        """The rest of the constructor, under this run's torch settings."""
        seed_everything(cfg.seed)
        self.method: Method = build_method(cfg)
        self.channels_last = (
            cfg.channels_last if cfg.channels_last is not None else self._channels_last_pays()
        )
        # issue 7: BN + add + ReLU fused for train-mode passes (bf16 channels_last on a CPU)
        self.fused_bn = (
            cfg.fused_bn
            if cfg.fused_bn is not None
            else self.device.type == "cpu" and self.precision == "bf16" and self.channels_last
        )
        if self.dist.enabled and hasattr(self.method, "batch_fraction"):
            self.method.batch_fraction = 1.0 / self.dist.world_size  # ACT's attack (issue 5)
        self.data = rank0_first(
            lambda: build_data(
                cfg, self.device, self.channels_last, self.dist.rank, self.dist.world_size
            )
        )
        self.threat = LinfBall(cfg.eps, cfg.step_size)
        # issue 8: PGD, FGSM-RS or Free-AT; Free-AT replays each batch and divides the epochs
        self.train_attack = build_train_attack(cfg, self.method)
        self.replays = self.train_attack.replays if self.train_attack is not None else 1
        # issue 7: on CUDA the passes of a step are launch-bound; replay them from CUDA graphs.
        # Under torchrun only when asked for: capture next to NCCL's own threads is untested.
        self.cuda_graphs = (
            cfg.cuda_graphs
            if cfg.cuda_graphs is not None
            else self.device.type == "cuda" and not self.dist.enabled
        )
        if cfg.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"--cuda-graphs: needs a CUDA device, this run uses {self.device}")
        self.num_epochs = scheduled_epochs(cfg)
        self.milestones = scheduled_milestones(cfg)
        self.models: dict[str, nn.Module] = {}
        self.specs: dict[str, dict] = {}
        for role in self.method.roles:
            kw = model_kwargs(cfg, role, self.data.info, self.data.num_classes)
            model = build_model(kw, role, cfg.dataset).to(self.device)
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if self.channels_last and self.device.type == "cpu" and self.precision == "fp32":
                if hazard := channels_last_fp32_hazard(model):
                    raise ConfigError(
                        f"--channels-last: on this CPU (no AVX-512) PyTorch's fp32 channels_last"
                        f" weight gradient of {kw['name']}'s strided 1x1 conv {hazard} corrupts"
                        " memory; leave channels_last off, or use a width of 8 or more"
                    )
            if self.device.type == "cpu" and self.precision == "bf16" and cpu_has_amx():
                # issue 7: oneDNN is slow at 512 channels, 4x4; its weight gradients at 4x4
                # (the latter goes with the fused kernels: off, a run rounds as before them)
                use_im2col_convs(model, weight_grads=self.fused_bn)
            if self.fused_bn:
                use_fused_bn(model)
            if cfg.batch_size == 1 and self.data.eval_x is not None:
                layer = single_value_batch_norm(model, self.data.eval_x[:1])
                if layer is not None:
                    raise ConfigError(
                        f"--batch-size 1: {kw['name']}'s batch norm '{layer}' would see one"
                        f" value per channel on {cfg.dataset}; it needs at least 2 images per"
                        " batch (per process) to train"
                    )
            if cfg.sync_bn and self.dist.enabled:
                model = distributed.convert_sync_batchnorm(model, self.device)
            self.models[role] = model
            self.specs[role] = model.spec
        # The modules the training forwards go through: DistributedDataParallel wrappers under
        # torchrun (gradients averaged over processes), the models themselves otherwise. The
        # attack, evaluation and checkpoints use the plain models (self.models).
        self.train_models: dict[str, nn.Module] = self.models
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device] if self.device.type == "cuda" else None
            # Buffers (BN running statistics) are broadcast from rank 0 once per step, before
            # the attack, instead of at every forward (see _sync_buffers).
            self.train_models = {
                r: DDP(m, device_ids=ids, forward_sync_buffers=False)
                for r, m in self.models.items()
            }
        self.lr_scale = self.dist.world_size if cfg.scale_lr else 1
        self.optimizers = {
            r: torch.optim.SGD(
                m.parameters(),
                lr=cfg.lr * self.lr_scale,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
            )
            for r, m in self.models.items()
        }
        # fp16 (an option on GPUs): dynamic loss scaling keeps small gradients from flushing to
        # zero; steps whose scaled gradients overflow are skipped by the scaler. bf16 needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.schedulers = {
            r: torch.optim.lr_scheduler.MultiStepLR(o, milestones=self.milestones, gamma=cfg.gamma)
            for r, o in self.optimizers.items()
        }
        # The whole update up to its gradients as one graph (actrain.step_graph); where that
        # cannot be (several processes, fp16, FGSM-RS/Free-AT), the PGD attack alone.
        self.graphed_update: GraphedUpdate | None = None
        self.graphed_attack: GraphedPGD | None = None
        if self.cuda_graphs and step_graph.supported(self) is None:
            self.graphed_update = GraphedUpdate(self, step_graph.model_streams_default(self))
        elif self.cuda_graphs and isinstance(self.train_attack, PGDTraining):
            self.graphed_attack = GraphedPGD(self.train_attack)
        if cfg.model_streams and self.graphed_update is None:
            why = step_graph.supported(self) or "--no-cuda-graphs"
            raise ConfigError(f"--model-streams: needs the update graph, which is off here: {why}")
        self.guard: OverfitGuard | None = None
        if overfit_guard_on(cfg):
            if self.data.eval_x is None or len(self.data.eval_y) == 0:
                raise ConfigError("--overfit-guard: needs held-out images (the evaluation set)")
            self.guard = OverfitGuard(
                self.data.eval_x,
                self.data.eval_y,
                cfg.eps,
                cfg.overfit_guard_steps,
                cfg.overfit_guard_threshold,
                cfg.overfit_guard_size,
                seed=cfg.seed,
            )
        self.epoch = 0  # current (0-based) epoch
        self.batch = 0  # batches of the current epoch already trained
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.partial = self._fresh_partial()
        self.stop_signal: str | None = None
        # None: runtime.fold_bn_default (issue 7)
        self.fold_bn: bool | None = cfg.fold_bn
        if resume:
            self._restore(load_checkpoint(self.run_dir / CHECKPOINT, map_location=self.device))
        if self.dist.rank > 0:
            # Attack starts: every process draws its own noise for its own shard.
            torch.manual_seed(mix_seed(cfg.seed, self.dist.rank, self.global_step))

    def _channels_last_pays(self) -> bool:
        """channels_last by default in bf16/fp16, and in fp32 where ``fp32_levers_pay``
        unless a model has a conv that PyTorch mishandles there (channels_last_fp32_hazard)."""
        if self.precision != "fp32":
            return True
        if not fp32_levers_pay(self.device):
            return False
        info = D.get_dataset_info(self.cfg.dataset)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            models = [
                build_model(
                    model_kwargs(self.cfg, r, info, info.num_classes or 2), r, self.cfg.dataset
                )
                for r in self.method.roles
            ]
        return not any(channels_last_fp32_hazard(m) for m in models)

    def _fresh_partial(self) -> dict[str, Any]:
        roles = self.method.roles
        return {
            "loss": {r: torch.zeros((), device=self.device) for r in roles},
            "correct": {r: torch.zeros((), device=self.device, dtype=torch.long) for r in roles},
            "seen": 0,
            "skipped": 0,
            "seconds": 0.0,
        }

    # ---- one step ----------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """Algorithm 1 for ACT (and the same shape for every other method and attack).

        One mini-batch: ``self.replays`` updates of the weights (1, or Free-AT's m), each with
        its own adversarial input. Loss and logits of the last update feed the metrics: under
        Free-AT that is the perturbation refined m - 1 times on this very batch.
        """
        # Training forwards go through the DDP wrappers under torchrun (issue 5).
        if self.dist.enabled:
            self._sync_buffers()
        out: dict[str, Any] = {}
        for _ in range(self.replays):
            out = self._update(x, y)
            if not out["finite"]:
                break
        return out

    def _update(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """One weight update: method context, attack, losses, one backward, optimiser steps."""
        method, models, attack = self.method, self.train_models, self.train_attack
        replayed = None
        if self.graphed_update is not None:  # the same passes and backward, replayed
            try:
                replayed = self.graphed_update(x, y)
            except CaptureFailed as exc:
                self._graphs_failed(exc)
        if replayed is not None:
            losses, logits, total = replayed
        else:
            for m in models.values():
                m.train()
            for_attack = attack is not None and attack.uses_objective
            with self.autocast():
                ctx = method.prepare(models, x, y, for_attack)  # ACT: F(x), computed once
            x_adv = self._attack(x, y, ctx)
            with self.autocast():
                out = method.losses(models, x, x_adv, y, ctx)  # ACT: L_G(delta*), L_F(delta*)
            losses, logits = out.losses, out.logits
            total = sum(losses.values())
        finite = bool(torch.isfinite(total))
        if self.dist.enabled:  # every process skips, or none does (else DDP would hang)
            finite = not bool(distributed.all_reduce_(torch.tensor([float(not finite)]), "max"))
        if not finite:
            return {"losses": losses, "logits": logits, "finite": False}
        if replayed is None:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if self.scaler is None:
                total.backward()  # each loss reaches only its own model (see actrain.losses)
            else:
                self.scaler.scale(total).backward()
            if attack is not None and x_adv is not x:
                attack.after_backward(x, x_adv)  # Free-AT: delta from this backward's grad
        for opt in self.optimizers.values():
            if self.scaler is None:
                opt.step()
            else:
                self.scaler.step(opt)
        if self.scaler is not None:
            self.scaler.update()
        return {"losses": losses, "logits": logits, "finite": True}

    def _graphs_failed(self, exc: Exception) -> None:
        if self.dist.is_main:
            print(
                f"actrain: note: CUDA graph capture failed ({exc}); training goes on without"
                " CUDA graphs (--no-cuda-graphs silences this)",
                file=sys.stderr,
            )
        self.graphed_update = self.graphed_attack = None

    def _attack(self, x: Tensor, y: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        """The adversarial input of this update (x itself for natural training)."""
        attack = self.train_attack
        if attack is None:
            return x
        if not attack.uses_objective:  # Free-AT: x + delta, whose gradient the update yields
            return attack.perturb(None, x, None, self.autocast)
        # issue 7: G with BN folded for the eval-mode attack passes (runtime.attack_model)
        # The attack runs on the plain G: input gradients only, no gradient all-reduce.
        g = attack_model(self.models["g"], self.fold_bn, self.precision)
        if self.graphed_attack is not None:
            try:
                return self.graphed_attack(g, x, y, ctx, self._attack_objective, self.autocast)
            except CaptureFailed as exc:
                self._graphs_failed(exc)
        return attack.perturb(g, x, self._attack_objective(ctx, y), self.autocast)

    def attack_folds_bn(self) -> bool:
        """Whether the attack passes run on a BN-folded view of G (Free-AT has none)."""
        attack = self.train_attack
        if attack is None or not attack.uses_objective:
            return False
        g = self.models["g"]
        return attack_model(g, self.fold_bn, self.precision) is not g

    def _attack_objective(self, ctx: dict[str, Tensor], y: Tensor) -> Objective:
        """The method's attack objective (ACT: L_G with F(x) detached)."""
        objective = self.method.attack_objective(ctx, y)
        if self.precision != "fp16":
            return objective
        # fp16: a fixed scale keeps the input gradient (only its signs are used) out of fp16's
        # underflow range
        return lambda logits: objective(logits) * FP16_ATTACK_SCALE

    # ---- epochs ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        roles = self.method.roles
        acc = self.partial
        loader = self.data.train
        bar = tqdm(
            total=len(loader),
            initial=self.batch,
            desc=f"epoch {epoch + 1}/{self.num_epochs}",
            unit="batch",
            disable=not (self.dist.is_main and live_progress(self.cfg.progress, sys.stderr)),
            leave=False,
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        for x, y in loader.epoch(epoch, start_batch=self.batch):
            out = self.train_step(x, y)
            if not out["finite"]:
                self._non_finite(out["losses"])
                acc["skipped"] += 1
            else:
                n = y.shape[0]
                acc["seen"] += n
                for r in roles:
                    acc["loss"][r] += out["losses"][r].detach().float() * n
                    acc["correct"][r] += (out["logits"][r].detach().argmax(1) == y).sum()
            self.batch += 1
            self.global_step += 1
            distributed.inject_fault(self.global_step)
            bar.update(1)
            if not bar.disable and (self.batch % 10 == 0 or self.batch == len(loader)):
                seen = max(acc["seen"], 1)
                rate = acc["seen"] / max(acc["seconds"] + time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    {f"loss_{r}": f"{acc['loss'][r].item() / seen:.3f}" for r in roles}
                    | {f"acc_{r}": f"{100 * acc['correct'][r].item() / seen:.1f}" for r in roles}
                    | {"img/s": f"{rate:.0f}"}
                )
            every = self.cfg.checkpoint_every
            stop = self._stop_requested()
            if stop or (every and self.global_step % every == 0):
                acc["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if self.batch < len(loader):
                    self.save_checkpoint()
                if stop and self.batch < len(loader):
                    bar.close()
                    self._stop_for_signal()
        bar.close()
        acc["seconds"] += time.perf_counter() - t0
        tot = self._global_partial()  # summed over processes under torchrun
        seen = max(tot["seen"], 1)
        stats: dict[str, float] = {
            "train_seconds": acc["seconds"],
            "images_per_s": tot["seen"] / max(acc["seconds"], 1e-9),
        }
        for r in roles:
            stats[f"loss_{r}"] = tot[f"loss_{r}"] / seen
            stats[f"train_acc_{r}"] = 100.0 * tot[f"correct_{r}"] / seen
        if tot["skipped"]:
            stats["skipped_batches"] = int(tot["skipped"])
        return stats

    # ---- several processes (issue 5) --------------------------------------------------------
    def _global_partial(self) -> dict[str, float]:
        """This epoch's metric sums so far, over all processes (this process's alone otherwise)."""
        acc = self.partial
        sums: dict[str, Any] = {"seen": acc["seen"], "skipped": acc["skipped"]}
        for r in self.method.roles:
            sums[f"loss_{r}"] = acc["loss"][r]
            sums[f"correct_{r}"] = acc["correct"][r]
        if not self.dist.enabled:
            return {
                k: float(v.item()) if isinstance(v, Tensor) else float(v) for k, v in sums.items()
            }
        return distributed.reduce_sums(sums, self.device)

    def _stop_requested(self) -> bool:
        """A signal was received: by this process, or under torchrun by any (all agree)."""
        if not self.dist.enabled:
            return bool(self.stop_signal)
        flag = torch.tensor([float(self.stop_signal is not None)])
        if bool(distributed.all_reduce_(flag, "max")) and self.stop_signal is None:
            self.stop_signal = "a signal to another process"
        return self.stop_signal is not None

    def _sync_buffers(self) -> None:
        """Rank 0's batch-norm running statistics on every process (DDP's convention)."""
        for m in self.models.values():
            distributed.broadcast_buffers(m)

    def _non_finite(self, losses: dict[str, Tensor]) -> None:
        bad = [r.upper() for r, v in losses.items() if not bool(torch.isfinite(v))]
        where = f"epoch {self.epoch + 1}, step {self.batch + 1}, model {'/'.join(bad) or '?'}"
        if self.cfg.nan_policy == "skip":
            print(f"actrain: non-finite loss at {where}; batch skipped", file=sys.stderr)
            return
        raise TrainingStopped(
            f"non-finite loss at {where}; {self._kept()} (--nan-policy skip skips such batches)",
            EXIT_FAILED,
        )

    def _kept(self) -> str:
        """What a stopped run leaves: its last checkpoint, or none (it said one was kept)."""
        if (self.run_dir / CHECKPOINT).is_file():
            return f"the last good checkpoint is kept in {self.run_dir}"
        return f"no checkpoint was written yet in {self.run_dir}"

    def _check_weights(self, epoch: int) -> None:
        """Stop before an epoch whose weights went non-finite is evaluated or checkpointed: a
        finite loss with a huge step can write inf into weights or BN statistics, after
        which every batch was skipped (--nan-policy skip) and the run ended "finished", its
        NaN logits scored as the share of class 0."""
        bad = [
            f"{role.upper()} {name}"
            for role, model in self.models.items()
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingStopped(
                f"non-finite weights after epoch {epoch + 1} ({shown}); {self._kept()}"
                " (a smaller --lr, or fp32, may help)",
                EXIT_FAILED,
            )

    def _stop_for_signal(self) -> None:
        raise TrainingStopped(
            f"stopped by {self.stop_signal} at epoch {self.epoch + 1}, step {self.batch};"
            f" checkpoint written. Resume with: actrain train --resume {self.run_dir}",
            EXIT_INTERRUPTED,
        )

    def evaluate(self) -> dict[str, float]:
        """Clean and PGD accuracy of every model on the fixed validation/test subset."""
        x, y = self.data.eval_x, self.data.eval_y
        if x is None or len(y) == 0:
            return {}
        cfg = self.cfg
        step = eval_step(cfg)
        # Its own generators: evaluating must not change the training run's random stream. One
        # per chunk of EVAL_BATCH examples (the first seeded as before), so that under torchrun
        # the chunks can be split over processes and the numbers stay the same.
        base = cfg.seed * 1000 + self.epoch
        starts = distributed.shard_starts(len(y), EVAL_BATCH)
        stats: dict[str, float] = {"eval_images": len(y)}  # what the percentages are of
        for role, model in self.models.items():
            clean = robust = 0
            steer = attack_model(model, self.fold_bn, self.precision)  # as the training attack
            for s in starts:
                seed = base if s == 0 else mix_seed(base, s)
                gen = torch.Generator(device=self.device).manual_seed(seed)
                res = pgd_robustness(
                    model,
                    x[s : s + EVAL_BATCH],
                    y[s : s + EVAL_BATCH],
                    cfg.eps,
                    step,
                    cfg.eval_steps,
                    restarts=1,
                    autocast=self.autocast,
                    generator=gen,
                    gradient_model=steer,
                )
                clean += int(res.clean_correct.sum())
                robust += int(res.robust.sum())
            if self.dist.enabled:
                tot = distributed.reduce_sums({"c": clean, "r": robust}, self.device)
                clean, robust = int(tot["c"]), int(tot["r"])
            stats[f"{self.data.eval_name}_clean_acc_{role}"] = 100.0 * clean / len(y)
            stats[f"{self.data.eval_name}_pgd{cfg.eval_steps}_acc_{role}"] = 100.0 * robust / len(y)
        return stats

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; the caller's torch settings are restored when it ends."""
        self._apply_torch_flags()  # again: a second fit() runs under them too
        try:
            return self._fit()
        finally:
            self._caller_flags.apply()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        main = self.dist.is_main
        total = self.num_epochs
        stopped = self.guard is not None and self.guard.triggered is not None
        if main and (self.epoch >= total or stopped):
            why = " (stopped by the overfitting guard)" if stopped else ""
            print(f"run already finished ({self.epoch}/{total} epochs){why}", file=sys.stderr)
        with self._signals():
            while self.epoch < total and not stopped:
                epoch = self.epoch
                lr = self.optimizers["g"].param_groups[0]["lr"]
                record = {"epoch": epoch + 1, "lr": lr, **self.train_epoch(epoch)}
                self._check_weights(epoch)
                if self.replays > 1:  # Free-AT: this pass cost `replays` epochs of updates
                    record["epochs_equivalent"] = (epoch + 1) * self.replays
                if self.dist.world_size > 1:  # global batch = batch_size x processes
                    record["processes"] = self.dist.world_size
                # what `auto` chose here (a resume on another machine may choose otherwise)
                record["device"], record["precision"] = self.device.type, self.precision
                if self.dist.enabled:
                    self._sync_buffers()  # evaluate and save rank 0's BN statistics
                last = epoch + 1 == total
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
                    t0 = time.perf_counter()
                    record.update(self.evaluate())
                    record["eval_seconds"] = time.perf_counter() - t0
                if self.guard is not None:  # after the evaluation: it reports the collapse
                    record.update(self.guard.check(epoch + 1, self.models, self.autocast))
                    stopped = self.guard.triggered is not None
                for s in self.schedulers.values():
                    s.step()
                self.history.append(record)
                self.epoch, self.batch = epoch + 1, 0
                self.partial = self._fresh_partial()
                self.save_checkpoint()
                if main:
                    with open(self.run_dir / METRICS, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                    print(format_record(record), file=sys.stderr, flush=True)
                    if stopped:
                        print(self.guard.message(), file=sys.stderr, flush=True)
                if self._stop_requested() and self.epoch < total and not stopped:
                    self._stop_for_signal()
        record = self.history[-1] if self.history else {}
        if main:
            self.save_final(record)
        return record

    @contextlib.contextmanager
    def _signals(self):
        """First SIGINT/SIGTERM: finish the step, checkpoint, exit 75. Second Ctrl-C: at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            # The next signal must find the default handlers: restore them before telling the
            # user (or a test reading stderr) that a second Ctrl-C quits at once.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.stop_signal = signal.Signals(signum).name
            print(
                f"\nactrain: {self.stop_signal} received; finishing this step and writing a"
                " checkpoint (Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ---- persistence ----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Every process calls this (metric sums are reduced); only rank 0 writes."""
        acc = self.partial
        part: dict[str, Any] = {
            "loss": {r: v.detach().cpu() for r, v in acc["loss"].items()},
            "correct": {r: v.detach().cpu() for r, v in acc["correct"].items()},
            "seen": acc["seen"],
            "skipped": acc["skipped"],
            "seconds": acc["seconds"],
        }
        if self.dist.enabled:
            tot = self._global_partial()
            part["loss"] = {r: torch.tensor(tot[f"loss_{r}"]) for r in self.method.roles}
            part["correct"] = {r: torch.tensor(int(tot[f"correct_{r}"])) for r in self.method.roles}
            part["seen"], part["skipped"] = int(tot["seen"]), int(tot["skipped"])
        # Free-AT's perturbation is per process (each attacks its own shard): rank 0 saves all.
        attack_state = self.train_attack.state_dict() if self.train_attack is not None else {}
        if self.dist.enabled and attack_state:
            attack_state = {"per_rank": distributed.gather_object(attack_state)}
        error = None
        if self.dist.is_main:
            error = self._write_checkpoint(part, attack_state)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise TrainingStopped(error, EXIT_FAILED)

    def _write_checkpoint(self, part: dict[str, Any], attack_state: Any = None) -> str | None:
        state = {
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            # issue 5: what the position and the lr refer to, for resuming on another
            # number of processes
            "world_size": self.dist.world_size,
            "global_batch": self.cfg.batch_size * self.dist.world_size,
            "lr_scale": self.lr_scale,
            "models": {r: m.state_dict() for r, m in self.models.items()},
            "optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
            "partial": part,
            "history": json.dumps(self.history),
            "rng": rng_state(),
            "specs": json.dumps(self.specs),
            "classes": json.dumps(self.data.classes),
            "config": self.cfg.to_json(),
            "train_attack": attack_state,
            "guard": self.guard.state_dict() if self.guard is not None else None,
        }
        try:
            save_checkpoint(self.run_dir / CHECKPOINT, state)
            self._supersede_final()
        except OSError as exc:
            return (
                f"cannot write the checkpoint in {self.run_dir} ({exc.strerror or exc});"
                " the previous checkpoint is kept"
            )
        return None

    def _supersede_final(self) -> None:
        """A finished run resumed for more epochs: once its checkpoint is newer than its final
        weights, final.json says so, and ``load_model`` / ``actrain eval RUN`` take the
        checkpoint (they took the older weights, and reports counted the run as finished)."""
        path = self.run_dir / "final.json"
        if not path.is_file():
            return
        summary = json.loads(path.read_text())
        if summary.get("status") == "finished" and self.epoch > summary.get("epochs", 0):
            summary["status"] = SUPERSEDED
            summary["checkpoint_epoch"] = self.epoch
            atomic_write_text(path, json.dumps(summary, indent=2))

    def _restore(self, ckpt: dict[str, Any]) -> None:
        saved_classes = json.loads(ckpt.get("classes") or "null")
        if saved_classes is not None and list(saved_classes) != list(self.data.classes or []):
            raise ConfigError(
                "--resume: the data's classes are not the run's (a class folder renamed, added"
                f" or removed?): saved {_names(saved_classes)}, found {_names(self.data.classes)}"
            )
        for r, m in self.models.items():
            if r not in ckpt["models"]:
                raise ConfigError(f"--resume: the checkpoint holds no model '{r}'")
            _load_state_checked(m, ckpt["models"][r], r)
            self.optimizers[r].load_state_dict(ckpt["optimizers"][r])
            sched = ckpt["schedulers"][r]
            sched["milestones"] = collections.Counter(self.milestones)
            self.schedulers[r].load_state_dict(sched)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if self.train_attack is not None and ckpt.get("train_attack"):
            state = ckpt["train_attack"]
            if "per_rank" in state:  # saved under torchrun: this rank's own, if it had one
                ranks = state["per_rank"]
                same = len(ranks) == self.dist.world_size
                state = ranks[self.dist.rank] if same else {}
            elif self.dist.rank > 0:
                state = {}
            self.train_attack.load_state_dict(state)
        if self.guard is not None and ckpt.get("guard"):
            self.guard.load_state_dict(ckpt["guard"])
        self.epoch = int(ckpt["epoch"])
        self.batch = int(ckpt.get("batch", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        self.history = json.loads(ckpt.get("history", "[]"))
        self._adapt_to_world(ckpt)
        part = ckpt.get("partial")
        if part is not None and self.batch and not self.dist.is_main:
            part = None  # the saved sums are over all processes: rank 0 carries them on
        if part is not None and self.batch:
            self.partial = {
                "loss": {r: v.to(self.device) for r, v in part["loss"].items()},
                "correct": {r: v.to(self.device) for r, v in part["correct"].items()},
                "seen": int(part["seen"]),
                "skipped": int(part["skipped"]),
                "seconds": float(part["seconds"]),
            }
        # metrics.jsonl is rewritten from the checkpoint so a kill between the two never
        # leaves a duplicated or missing epoch line.
        if self.dist.is_main:
            atomic_write_text(
                self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.history)
            )

    def _adapt_to_world(self, ckpt: dict[str, Any]) -> None:
        """A checkpoint from another number of processes (or per-process batch): the position
        in the epoch is converted through the examples already seen, and with --scale-lr the
        learning rate follows the new number of processes."""
        global_batch = self.cfg.batch_size * self.dist.world_size
        saved_batch = int(ckpt.get("global_batch", global_batch))
        saved_world = int(ckpt.get("world_size", self.dist.world_size))
        if saved_batch != global_batch and saved_world == self.dist.world_size:
            # the batch is part of the recipe: it may change only with the process count
            raise ConfigError(
                f"--resume: --batch-size {self.cfg.batch_size} would change the run's batch"
                f" ({saved_batch // saved_world} per process x {saved_world}); the batch size"
                " may change on resume only with the number of processes (torchrun), to keep"
                " the global batch"
            )
        if self.batch and saved_batch != global_batch:
            seen = self.batch * saved_batch
            if seen % global_batch:
                raise ConfigError(
                    f"--resume: the checkpoint is {self.batch} steps of {saved_batch} examples"
                    f" into epoch {self.epoch + 1}, which is not a whole number of steps of the"
                    f" new global batch ({self.cfg.batch_size} x {self.dist.world_size}"
                    f" processes = {global_batch}); resume with a global batch dividing"
                    f" {seen}, or from an end-of-epoch checkpoint"
                )
            self.batch = seen // global_batch
        saved_scale = float(ckpt.get("lr_scale", 1))
        if saved_scale != self.lr_scale:
            ratio = self.lr_scale / saved_scale
            for r, opt in self.optimizers.items():
                for group in opt.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
                sched = self.schedulers[r]
                sched.base_lrs = [lr * ratio for lr in sched.base_lrs]
                sched._last_lr = [g["lr"] for g in opt.param_groups]

    def runtime(self) -> dict[str, Any]:
        """The settings config.json leaves to `auto`, as this process resolved them."""
        attack = self.train_attack
        graphs: str | bool = False
        if self.graphed_update is not None:
            graphs = "update, F on a second stream" if self.graphed_update.side else "update"
        elif self.graphed_attack is not None:
            graphs = "attack"
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "fold_bn": self.attack_folds_bn(),
            "fused_bn": any(fused_bn_ran(m) for m in self.models.values()),
            "cuda_graphs": graphs,
            "attack_start": getattr(attack, "start", "zero" if attack is not None else None),
            "overfit_guard": self.guard is not None,
        }

    def save_final(self, record: dict[str, Any]) -> None:
        meta = {
            "config": self.cfg.to_dict(),
            "classes": self.data.classes,
            "epochs_trained": self.epoch,
        }
        for role, model in self.models.items():
            save_weights(self.run_dir / f"model_{role}.safetensors", model, {**meta, "role": role})
        summary: dict[str, Any] = {
            "status": "finished",
            "epochs": self.epoch,
            "last": record,
            "runtime": self.runtime(),
        }
        if self.train_attack is not None:
            summary["train_attack"] = self.train_attack.name
            if self.replays > 1:
                summary["replays"] = self.replays
                summary["epochs_equivalent"] = self.epoch * self.replays
        if self.guard is not None:
            summary["overfit_guard"] = self.guard.summary()
            if self.guard.triggered:
                # the weights written are the best epoch's, not the last record's
                summary["final_weights_epoch"] = self.guard.best_epoch
        atomic_write_text(self.run_dir / "final.json", json.dumps(summary, indent=2))


def _names(classes: list[str] | None) -> str:
    classes = list(classes or [])
    more = f", ... ({len(classes)})" if len(classes) > 6 else ""
    return "[" + ", ".join(map(str, classes[:6])) + more + "]"


def _load_state_checked(model: nn.Module, state: dict[str, Tensor], role: str) -> None:
    own = model.state_dict()
    diff = sorted(set(own) ^ set(state))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if diff or shapes:
        what = f"key {diff[0]}" if diff else f"shape of {shapes[0]}"
        raise ConfigError(
            f"--resume: the checkpoint's model {role.upper()} does not match the configured"
            f" architecture ({what})"
        )
    model.load_state_dict(state)


def malloc_note(device: torch.device) -> str:
    """(malloc jemalloc) on CPUs where actrain.malloc preloaded one (a CPU step's speed
    depends on it), nothing otherwise."""
    name = malloc_in_use() if device.type == "cpu" else "system"
    return "" if name == "system" else f" (malloc {name})"


def attack_note(cfg: TrainConfig, trainer: Trainer) -> str:
    """The start line's account of the training attack (issue 8)."""
    attack = trainer.train_attack
    if attack is None:
        return ""
    eps = f"eps {cfg.eps:.4g} step {cfg.step_size:.4g}"
    if attack.name == "pgd":
        what = f"PGD-{cfg.steps} {eps}"
    elif attack.name == "fgsm-rs":
        what = f"FGSM-RS {eps}"
    else:
        n, m = trainer.num_epochs, trainer.replays
        rounded = ""
        if n * m != cfg.epochs:
            rounded = f", --epochs {cfg.epochs} rounded up to whole passes"
        what = (
            f"Free-AT m={m} {eps} ({n} pass{'es' if n != 1 else ''} over the data ="
            f" {n * m} epochs of cost{rounded})"
        )
    guard = ", overfitting guard on" if trainer.guard is not None else ""
    return f" attack {what}{guard},"


def format_record(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}", f"lr {r['lr']:.4g}"]
    for k, v in r.items():
        if k.startswith(("loss_", "train_acc_")) or "_acc_" in k:
            parts.append(f"{k} {v:.3f}" if k.startswith("loss") else f"{k} {v:.1f}%")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    return "  ".join(parts)


# ---- run folders ------------------------------------------------------------------------------
def default_run_dir(cfg: TrainConfig) -> Path:
    width = f"-w{cfg.width}" if cfg.width else ""
    base = Path("runs") / f"{cfg.method}-{cfg.dataset}-{cfg.arch}{width}-s{cfg.seed}"
    if not base.exists():
        return base
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return base.with_name(f"{base.name}-{stamp}")


def never_started(run_dir: Path) -> bool:
    """A run folder holding its config.json and no other run file: a start that failed
    before its first checkpoint (a bad image, an error in the first epoch)."""
    others = [name for name in RUN_FILES if name != CONFIG]
    return is_run_config(run_dir / CONFIG) and not any((run_dir / n).exists() for n in others)


def _refuse_run_files(run_dir: Path) -> None:
    """A folder holding a run, or files a run writes, is not written over without --overwrite."""
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return
    if (run_dir / CONFIG).exists() or (run_dir / CHECKPOINT).exists():
        raise ConfigError(
            f"--out: {run_dir} already holds a run; pass --resume to continue it or"
            " --overwrite to replace it"
        )
    raise ConfigError(
        f"--out: {run_dir} already holds {', '.join(present)}, which the run would write;"
        " give another --out, or --overwrite to replace them"
    )


def prepare_run_dir(cfg: TrainConfig, overwrite: bool) -> Path:
    """A fresh run folder; an existing run is never replaced unless ``overwrite``."""
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} exists and is not a folder")
    if (run_dir / CONFIG).exists() and not is_run_config(run_dir / CONFIG):
        # another program's config.json: it was deleted as the leftover of a failed start
        raise ConfigError(
            f"--out: {run_dir} holds a config.json that actrain did not write; give another"
            " --out (nothing was changed)"
        )
    if not overwrite and not never_started(run_dir):  # refused before the lock file is made
        _refuse_run_files(run_dir)
    if run_dir.is_dir():  # before anything in it is touched (--overwrite deleted a live run)
        hold_run_lock(run_dir).close()
    if never_started(run_dir):  # only the config of a start that failed: nothing to keep
        (run_dir / CONFIG).unlink()
    if not overwrite:  # again under the lock: a run may have written its files meanwhile
        _refuse_run_files(run_dir)
    elif any((run_dir / name).exists() for name in RUN_FILES):
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        # what was derived from the replaced run's models stays, under a name the report does
        # not read (kept as eval/ and analysis/, it was credited to the new run)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        for derived in ("eval", "analysis"):
            if (run_dir / derived).exists():
                (run_dir / derived).rename(run_dir / f"{derived}.replaced-{stamp}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out: cannot write to {run_dir} ({exc.strerror})") from None
    cfg.out = str(run_dir)
    return run_dir


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train ``cfg``; under torchrun every process calls this and rank 0 writes the run folder."""
    if not distributed.launched():
        return _run_training(cfg, resume, overwrite, distributed.SINGLE)
    device = resolve_device(distributed.device_name(cfg.device))
    try:
        d = distributed.init(device, cfg.dist_backend)
        run_dir = _run_training(cfg, resume, overwrite, d)
    except (UserError, TrainingStopped) as exc:
        # Same message, naming the process (every process may report the same problem).
        env = distributed.env_info()
        msg = f"{exc} [rank {env.rank}/{env.world_size}]"
        if isinstance(exc, TrainingStopped):
            raise TrainingStopped(msg, exc.exit_code) from None
        raise type(exc)(msg) from None
    except BaseException as exc:
        distributed.report_failure(exc)
        raise
    distributed.cleanup()
    return run_dir


def _run_training(cfg: TrainConfig, resume: bool, overwrite: bool, d: distributed.DistInfo) -> Path:
    # The resolved folders below go into a copy: the caller's config stays as it was given
    # (a library user may reuse it, e.g. for a second run with another --out).
    cfg = copy.deepcopy(cfg)
    created = False  # whether this call made the run folder (removed again if start fails)
    if cfg.data_dir:  # recorded absolute: eval, analyze and resume find it from any folder
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    if resume:
        run_dir = Path(cfg.out)
    else:
        target = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        created = d.is_main and not target.exists()
        # Rank 0 chooses and prepares the folder; the others learn its name (or its error).
        answer: tuple[str | None, str | None] = (None, None)
        if d.is_main:
            try:
                answer = (str(prepare_run_dir(cfg, overwrite)), None)
            except ConfigError as exc:
                answer = (None, str(exc))
        answer = distributed.broadcast_object(answer)
        if answer[1] is not None:
            raise ConfigError(answer[1])
        run_dir = Path(answer[0])
        cfg.out = str(run_dir)
    lock, busy = None, None
    if d.is_main:  # one trainer per run folder (a sweep's re-run once raced its stopped runs)
        try:
            lock = hold_run_lock(run_dir)
        except ConfigError as exc:
            busy = str(exc)
    busy = distributed.broadcast_object(busy)
    if busy is not None:
        raise ConfigError(busy)
    try:
        trainer = Trainer(cfg, run_dir, resume=resume)
        if resume and trainer.epoch > trainer.num_epochs:  # config.json would say fewer
            done = trainer.epoch * max(cfg.replays, 1)  # Free-AT: passes x replays
            raise ConfigError(
                f"--resume --epochs {cfg.epochs}: {run_dir} has already trained {done} epochs;"
                f" give --epochs {done} or more (or leave it out)"
            )
    except BaseException:  # a mistake, or Ctrl-C while the data loads
        if lock is not None:
            lock.close()
            (run_dir / RUN_LOCK).unlink(missing_ok=True)
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that could not start leaves no empty folder behind
        raise
    roles = "+".join(r.upper() for r in trainer.method.roles)
    if d.is_main:
        # Written once data and models are built, so a run that failed to start blocks
        # nothing; on resume it records the allowed changes (such as more epochs).
        atomic_write_text(run_dir / CONFIG, cfg.to_json())
        distributed.mark_run_dir(run_dir)
        batch = f"batch {cfg.batch_size}"
        if d.enabled:
            batch = (
                f"batch {cfg.batch_size} per process x {d.world_size} processes"
                f" = global batch {cfg.batch_size * d.world_size} ({d.backend},"
                f" lr {cfg.lr * trainer.lr_scale:g}{' scaled' if cfg.scale_lr else ''},"
                f" {'sync' if cfg.sync_bn else 'per-process'} BN)"
            )
        print(
            f"actrain: {cfg.method} on {cfg.dataset}"
            f" ({trainer.data.train.num_examples} train images), {cfg.arch} [{roles}],"
            f" device {trainer.device}{malloc_note(trainer.device)}, precision"
            f" {trainer.precision}, {batch},{attack_note(cfg, trainer)}"
            f" epochs {trainer.epoch + 1}..{trainer.num_epochs}"
            f" -> {run_dir}",
            file=sys.stderr,
        )
        if note := slow_bf16_note(trainer.device, trainer.precision):
            print(note, file=sys.stderr)
        if trainer.fused_bn and not fused.available():
            print(
                "actrain: note: the fused batch-norm kernels could not be built (is a C compiler"
                " with OpenMP installed?); training uses the plain ops, about 20 % slower",
                file=sys.stderr,
            )
    try:
        trainer.fit()
    finally:
        if lock is not None:
            lock.close()  # the lock goes with the file's descriptor (also if this process dies)
    return run_dir


RUN_LOCK = ".training.lock"


def hold_run_lock(run_dir: Path) -> IO[str]:
    """An exclusive lock on ``run_dir`` for this process's training (released when the
    returned file is closed or the process ends, however it ends); a folder another live
    process is training is refused, with that process's id."""
    import fcntl

    path = run_dir / RUN_LOCK
    fh = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise ConfigError(
            f"--out: {run_dir} is being trained by another process (pid {pid}); wait for it or"
            " stop it (Ctrl-C writes its checkpoint), then resume"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
