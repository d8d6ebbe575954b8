"""Training-step benchmark: actrain's own ``Trainer.train_step`` against a plain fp32 step.

The fast path is the real :class:`actrain.train.Trainer` built on synthetic data of the chosen
shape (nothing is read from or written to disk) and fed by the real in-memory loader, so data
time, augmentation included, is part of what is measured. Next to it the benchmark times

* the *essential passes* of the step in isolation (K attack passes with input gradients only,
  one forward/backward of G, one of F), one of each after every timed step, so that
  ``overhead_ratio = step / essential`` shows what the step spends beyond them (losses,
  optimiser steps, glue) and not how the machine's speed drifted in between;
* a *plain reference*: the same step written the straightforward way, fp32, NCHW, PyTorch
  defaults, as the authors' released code does it (:class:`PlainReference`). The test suite
  checks that it and the fp32 trainer step give identical losses and updates.

``--train-attack`` (issue 8) times FGSM-RS and Free-AT steps the same way; a Free-AT step is one
mini-batch, i.e. its m replays (``ms_per_update`` is the time of one of them).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from actrain import data as D
from actrain import losses as L
from actrain import train as T
from actrain.attacks.graphed import CaptureFailed, GraphedPGD
from actrain.config import WIDTH_ARCHES, TrainConfig, build_config
from actrain.fused import fused_bn_ran
from actrain.malloc import malloc_in_use
from actrain.methods import build_method, build_train_attack
from actrain.models import create_model
from actrain.runtime import (
    AttackView,
    attack_model,
    autocast_dtype,
    configure_threads,
    eval_fold_bn_default,
    use_attack_view,
)

SYNTHETIC_BATCHES = 4  # distinct batches of synthetic images the loader cycles through


@dataclass
class BenchSpec:
    """One benchmark configuration (the flags of ``actrain bench``)."""

    method: str = "act"
    arch: str = "resnet18"
    width: int | None = 16
    batch_size: int = 128
    steps: int = 10  # K, PGD steps per training step
    train_attack: str = "pgd"  # pgd, fgsm-rs or free (issue 8)
    replays: int | None = None  # Free-AT's m (None: the config default, 4)
    precision: str = "auto"
    channels_last: bool | None = None  # None: the Trainer's default (bf16/fp16; fp32 on AVX2)
    fold_bn: bool | None = None  # None: runtime.fold_bn_default
    fused_bn: bool | None = None  # None: the Trainer's default (actrain.fused)
    cuda_graphs: bool | None = None  # None: the Trainer's default (on with CUDA)
    model_streams: bool | None = None  # None: the Trainer's default (ACT, update graph)
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode (e.g. "max-autotune-no-cudagraphs")
    dataset: str = "cifar10"  # only its shape (channels, size, classes) and augmentation
    device: str = "auto"
    threads: int | None = None
    iters: int = 5
    warmup: int = 2
    reference: bool = True
    reference_iters: int = 2
    flops: bool = True  # count the step's FLOPs and time a large matrix product beside it
    seed: int = 0
    clock: str = "wall"  # "cpu": this process's CPU time, load-independent with threads=1
    extra: dict[str, Any] = field(default_factory=dict)  # further TrainConfig values

    def train_config(self) -> TrainConfig:
        values = {
            "method": self.method,
            "dataset": self.dataset,
            "arch": self.arch,
            # --width (default 16) is for the ResNet-18-like models; the others are fixed
            "width": self.width if self.arch in WIDTH_ARCHES else None,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "train_attack": self.train_attack,
            "replays": self.replays,
            "overfit_guard": False,  # synthetic data has no held-out batch; fit() is not run
            "precision": self.precision,
            "channels_last": self.channels_last,
            "fold_bn": self.fold_bn,
            "fused_bn": self.fused_bn,
            "cuda_graphs": self.cuda_graphs,
            "model_streams": self.model_streams,
            "device": self.device,
            "seed": self.seed,
            "epochs": 1,
            "eval_every": 0,
            "progress": False,
            "download": False,
            **self.extra,
        }
        return build_config({}, values)


# ---- a Trainer on synthetic data ------------------------------------------------------------


def synthetic_images(
    info: D.DatasetInfo, n: int, num_classes: int, seed: int = 0
) -> D.ImageTensors:
    gen = torch.Generator().manual_seed(seed)
    size = info.image_size or 224
    images = torch.randint(0, 256, (n, info.in_channels, size, size), generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    classes = [str(c) for c in range(num_classes)]
    return D.ImageTensors(images.to(torch.uint8), labels, torch.arange(n), classes)


def synthetic_trainer(cfg: TrainConfig, batches: int = SYNTHETIC_BATCHES) -> T.Trainer:
    """``Trainer(cfg)`` with its data replaced by random uint8 images of the data set's shape.

    The Trainer's own constructor builds models, optimisers and schedulers; only its
    ``build_data`` is swapped, for the duration of the call, for one that returns synthetic
    images behind the real in-memory loader.
    """
    info = D.get_dataset_info(cfg.dataset)
    num_classes = info.num_classes or 1000

    def build_data(
        cfg: TrainConfig, device: torch.device, channels_last: bool, *_: Any, **__: Any
    ) -> T.RunData:
        images = synthetic_images(info, cfg.batch_size * batches, num_classes, cfg.seed)
        augment = info.augment if info.augment in D.AUGMENTATIONS else "none"
        loader = D.InMemoryLoader(
            images,
            cfg.batch_size,
            device=device,
            shuffle=True,
            augment=augment,
            drop_last=True,
            seed=cfg.seed,
            channels_last=channels_last,
        )
        return T.RunData(info, num_classes, loader, None, None, "none", images.classes)

    original = T.build_data
    T.build_data = build_data
    try:
        return T.Trainer(cfg, Path(os.devnull))
    finally:
        T.build_data = original


def endless_batches(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


# ---- the plain reference step ---------------------------------------------------------------


class PlainReference:
    """The straightforward step: fp32, NCHW, no autocast, one optimiser step per model.

    ACT: F(x) once (train mode); K PGD steps on G in eval mode with ``torch.autograd.grad``
    w.r.t. the input; G(x + delta) in train mode; both losses; backward and step for G, then
    for F. Madry, TRADES and natural training are written the same way. FGSM-RS is the same
    with one step from a uniform start; Free-AT is Shafahi et al.'s loop written out
    (:meth:`free_step`).
    """

    def __init__(self, cfg: TrainConfig, in_channels: int, num_classes: int) -> None:
        self.cfg = cfg
        self.device = T.resolve_device(cfg.device)
        self.method = build_method(cfg)
        self.start = self.method.start
        if cfg.train_attack == "fgsm-rs" and cfg.attack_start == "auto":
            self.start = "uniform"
        self.attack_steps = 1 if cfg.train_attack == "fgsm-rs" else cfg.steps
        self.delta: Tensor | None = None  # Free-AT's perturbation, carried between batches
        info = D.DatasetInfo("synthetic", num_classes, in_channels, None, "none", True)
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for role in self.method.roles:
            model = create_model(**T.model_kwargs(cfg, role, info, num_classes)).to(self.device)
            self.models[role] = model
            self.optimizers[role] = torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )

    def load_from(self, models: dict[str, nn.Module]) -> None:
        for role, model in self.models.items():
            model.load_state_dict(models[role].state_dict())

    def _start(self, x: Tensor) -> Tensor:
        cfg, start = self.cfg, self.start
        if start == "uniform":
            noise = (2 * torch.rand(x.shape, device=x.device, dtype=x.dtype) - 1) * cfg.eps
        elif start == "gaussian":
            noise = 0.001 * torch.randn(x.shape, device=x.device, dtype=x.dtype)
        else:
            return x.clone()
        return self._project(x + noise, x)

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        eps = self.cfg.eps
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)

    def _attack(self, g: nn.Module, x: Tensor, objective) -> Tensor:
        x_adv = self._start(x.detach())
        g.eval()
        for _ in range(self.attack_steps):
            x_adv.requires_grad_(True)
            loss = objective(g(x_adv))
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = self._project(x_adv.detach() + self.cfg.step_size * grad.sign(), x)
        g.train()
        return x_adv.detach()

    def _update(self, role: str, loss: Tensor) -> None:
        opt = self.optimizers[role]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        cfg, name = self.cfg, self.method.name
        g = self.models["g"]
        for m in self.models.values():
            m.train()
        if cfg.train_attack == "free" and name != "natural":
            return self.free_step(x, y)
        if name == "natural":
            loss = L.natural_loss(g(x), y)
            self._update("g", loss)
            return {"g": loss.detach()}
        if name == "madry":
            x_adv = self._attack(g, x, lambda lg: L.madry_attack_objective(lg, y))
            loss = L.madry_loss(g(x_adv), y)
            self._update("g", loss)
            return {"g": loss.detach()}
        if name == "trades":
            g.eval()
            with torch.no_grad():
                ref = g(x)
            x_adv = self._attack(g, x, lambda lg: L.trades_attack_objective(lg, ref))
            loss = L.trades_loss(g(x), g(x_adv), y, cfg.beta)
            self._update("g", loss)
            return {"g": loss.detach()}
        f = self.models["f"]
        logits_f = f(x)
        ref = logits_f.detach()
        x_adv = self._attack(
            g,
            x,
            lambda lg: L.act_attack_objective(
                lg, ref, y, cfg.alpha, cfg.attack_temperature, cfg.attack_kl_reduction
            ),
        )
        loss_g, loss_f = L.act_losses(g(x_adv), logits_f, y, cfg.alpha, cfg.temperature)
        self._update("g", loss_g)
        self._update("f", loss_f)
        return {"g": loss_g.detach(), "f": loss_f.detach()}

    def free_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Shafahi et al.'s Algorithm 1: m replays of the batch, each one backward giving the
        weight gradients and grad_x; delta <- clip(delta + step sign(grad_x)) carries over."""
        cfg, name = self.cfg, self.method.name
        g = self.models["g"]
        n = x.shape[0]
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x)
        if self.delta.shape[0] < n:
            self.delta = torch.cat([self.delta, torch.zeros_like(x[self.delta.shape[0] :])])
        losses: dict[str, Tensor] = {}
        for _ in range(cfg.replays):
            x_adv = self._project(x + self.delta[:n], x).requires_grad_(True)
            if name == "madry":
                loss = L.madry_loss(g(x_adv), y)
                self._update("g", loss)
                losses = {"g": loss.detach()}
            elif name == "trades":
                loss = L.trades_loss(g(x), g(x_adv), y, cfg.beta)
                self._update("g", loss)
                losses = {"g": loss.detach()}
            else:
                logits_f = self.models["f"](x)
                logits_g = g(x_adv)
                loss_g, loss_f = L.act_losses(logits_g, logits_f, y, cfg.alpha, cfg.temperature)
                self._update("g", loss_g)  # grad_x comes from L_G (L_F detaches G's output)
                self._update("f", loss_f)
                losses = {"g": loss_g.detach(), "f": loss_f.detach()}
            step = x_adv.detach() + cfg.step_size * x_adv.grad.sign()
            self.delta[:n] = self._project(step, x) - x
        return losses


# ---- timing ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory since :meth:`reset`: the CUDA allocator's peak, or on the CPU the process's
    peak RSS (Linux: writing 5 to /proc/self/clear_refs resets it), each above what was held at
    the reset. The benchmark resets before building the models, so the figure holds models,
    optimiser state, data, activations and allocator slack."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    @staticmethod
    def _status(key: str) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError, AttributeError):  # jemalloc's (actrain.malloc) too
            mallctl = ctypes.CDLL(None).mallctl
            mallctl(b"thread.tcache.flush", None, None, None, 0)
            mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: every arena
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self._status("VmRSS")

    def peak_mb(self) -> tuple[float, float]:
        """(peak during the region, peak minus what was held at its start), in MiB."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status("VmHWM")
        return peak / 2**20, max(peak - self.base, 0) / 2**20


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn, reps: int, device: torch.device, warm: bool = True) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls (after one untimed call if ``warm``)."""
    if warm:
        fn()
        _sync(device)
    times = []
    for _ in range(reps):
        t0 = _clock()
        fn()
        _sync(device)
        times.append(_clock() - t0)
    return statistics.median(times)


def essential_passes(trainer: T.Trainer, x: Tensor, y: Tensor) -> dict[str, Callable[[], object]]:
    """The passes a step cannot do without, as functions to time, with the trainer's models,
    precision and attack model: ``attack`` (K passes with input gradients only; TRADES adds its
    eval-mode forward), ``g`` (G's forward/backward) and ``f`` (F's), where the method has
    them. None of them changes a weight."""
    method, models, cfg = trainer.method, trainer.models, trainer.cfg
    fold = trainer.fold_bn
    for m in models.values():
        m.train()
    with trainer.autocast(), torch.no_grad():
        ctx = method.prepare(models, x, y)
    ctx = {k: v.detach() for k, v in ctx.items()}
    passes: dict[str, Callable[[], object]] = {}
    x_adv = x
    attack_obj = build_train_attack(cfg, method)
    if attack_obj is not None and attack_obj.uses_objective and attack_obj.attack_passes > 0:
        objective = method.attack_objective(ctx, y)
        graphed = trainer.graphed_attack
        if graphed is None and trainer.graphed_update is not None:
            graphed = GraphedPGD(attack_obj)

        def attack() -> Tensor:
            if method.name == "trades":
                with trainer.autocast():
                    method.prepare(models, x, y)
            g = attack_model(models["g"], fold, trainer.precision)
            if graphed is not None:  # replayed from a CUDA graph, as the step does
                with contextlib.suppress(CaptureFailed):
                    return graphed(g, x, y, ctx, trainer._attack_objective, trainer.autocast)
            return attack_obj.perturb(g, x, objective, trainer.autocast)

        passes["attack"] = attack
        x_adv = attack()
    elif attack_obj is not None and not attack_obj.uses_objective:
        x_adv = x.clone()  # Free-AT: its G pass on x + delta also yields grad_x (below)

    def pass_of(role: str, inputs: tuple[Tensor, ...]) -> Callable[[], None]:
        model = models[role]

        def run() -> None:
            with trainer.autocast():
                logits = [model(t) for t in inputs]
            loss = sum(L.cross_entropy(lg, y) for lg in logits)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    g_inputs = (x,) if not method.adversarial else (x_adv,)
    if method.name == "trades":
        g_inputs = (x, x_adv)
    passes["g"] = pass_of("g", g_inputs)
    if "f" in models:
        passes["f"] = pass_of("f", (x,))
    return passes


def _all_modules(trainer: T.Trainer) -> list[torch.nn.Module]:
    """Every module of the trainer's models and of G's attack view (where it has one)."""
    models = list(trainer.models.values())
    g = attack_model(trainer.models["g"], trainer.fold_bn, trainer.precision)
    return [m for model in [*models, g] for m in model.modules()]


def fold_active(trainer: T.Trainer) -> bool:
    """Whether the trainer's attack passes run on a BN-folded view of G (Free-AT has none)."""
    return trainer.attack_folds_bn()


def _compile(trainer: T.Trainer, mode: str | None = None) -> None:
    """torch.compile every model and G's attack model (BN-folded view when folding is on)."""
    fold = trainer.fold_bn
    g = trainer.models["g"]
    view = None
    if attack_model(g, fold, trainer.precision) is not g:
        view = AttackView(g, autocast_dtype(trainer.precision))
    train_models = getattr(trainer, "train_models", trainer.models)
    for role, model in list(trainer.models.items()):
        compiled = torch.compile(model, mode=mode)
        if train_models is not trainer.models:
            train_models[role] = compiled
        trainer.models[role] = compiled
    if view is not None:
        view.module = torch.compile(view.module, mode=mode)
        use_attack_view(trainer.models["g"], view)
    else:  # the attack runs on (compiled) G itself
        trainer.fold_bn = False


_PRIMED: set[tuple[str, str, str]] = set()


def _prime(spec: BenchSpec) -> None:
    """One tiny step first, so one-time start-up costs (kernel libraries, thread pools, lazy
    imports) count neither in the first configuration's memory nor in its time."""
    key = (spec.method, spec.precision, spec.device)
    if key in _PRIMED:
        return
    tiny = BenchSpec(**{**asdict(spec), "width": 8, "batch_size": 2, "steps": min(spec.steps, 1)})
    trainer = synthetic_trainer(tiny.train_config(), batches=1)
    trainer.train_step(*next(endless_batches(trainer.data.train)))
    _PRIMED.add(key)


def _use_clock_and_threads(spec: BenchSpec) -> int:
    """Time with ``spec.clock`` and run on ``spec.threads``; returns the thread count."""
    global _clock
    if spec.clock not in CLOCKS:
        raise ValueError(f"unknown clock {spec.clock!r} (wall, cpu)")
    _clock = CLOCKS[spec.clock]
    return configure_threads(spec.threads)


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Time ``spec`` and return the result record (the ``--json`` object)."""
    threads = _use_clock_and_threads(spec)
    cfg = spec.train_config()
    torch.manual_seed(spec.seed)
    device = T.resolve_device(cfg.device)
    _prime(spec)
    memory = PeakMemory(device)
    memory.reset()  # peak memory is counted from before the models exist
    trainer = synthetic_trainer(cfg)
    batches = endless_batches(trainer.data.train)
    compile_s = 0.0
    if spec.compile:
        _compile(trainer, spec.compile_mode)
        x, y = next(batches)
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        trainer.train_step(x, y)  # the eval-mode attack and train-mode passes compile apart
        _sync(device)
        compile_s = time.perf_counter() - t0  # wall time: compile workers are other processes
    for _ in range(spec.warmup):
        x, y = next(batches)
        trainer.train_step(x, y)
    _sync(device)

    # Each round times one step and then each essential pass once, so that drift in the
    # machine's speed (10 % within minutes on a shared host) hits both sides of step/essential.
    # An untimed step opens each round: the first step after the passes finds the memory they
    # freed handed back to the system and page-faults it in again (~10 % of an ACT step at
    # width 16), which consecutive steps of a real run do not.
    passes = essential_passes(trainer, *next(batches))
    data_s, step_s = [], []
    pass_s: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(spec.iters):
        trainer.train_step(*next(batches))
        t0 = _clock()
        x, y = next(batches)
        _sync(device)
        t1 = _clock()
        trainer.train_step(x, y)
        _sync(device)
        t2 = _clock()
        data_s.append(t1 - t0)
        step_s.append(t2 - t1)
        for name, fn in passes.items():
            t3 = _clock()
            fn()
            _sync(device)
            pass_s[name].append(_clock() - t3)
    _, peak_mb = memory.peak_mb()

    step = statistics.median(step_s)
    data_t = statistics.median(data_s)
    # Free-AT: each of the m replays is one G (and F) update; the attack has no passes of its own
    essential = {"attack": 0.0, "g": 0.0, "f": 0.0}
    for name, times in pass_s.items():
        essential[name] = statistics.median(times) * (1 if name == "attack" else trainer.replays)
    essential_s = sum(essential.values())
    bs = cfg.batch_size
    result: dict[str, Any] = {
        "method": cfg.method,
        "arch": cfg.arch,
        "width": cfg.width,
        "dataset": cfg.dataset,
        "batch_size": bs,
        "steps": cfg.steps,
        "train_attack": cfg.train_attack,
        "replays": trainer.replays,
        "attack_passes": trainer.train_attack.attack_passes if trainer.train_attack else 0,
        "precision": trainer.precision,
        "channels_last": trainer.channels_last,
        "fold_bn": fold_active(trainer),
        "im2col": any(getattr(m, "im2col_used", False) for m in _all_modules(trainer)),
        "mm_wgrad": any(
            getattr(m, "matmul_weight_grad_used", False) for m in _all_modules(trainer)
        ),
        "fused_bn": any(fused_bn_ran(m) for m in trainer.models.values()),
        "cuda_graphs": trainer.graphed_attack is not None,
        "step_graph": trainer.graphed_update is not None,
        "model_streams": trainer.graphed_update is not None
        and trainer.graphed_update.side is not None,
        "compile": spec.compile,
        "compile_mode": spec.compile_mode,
        "compile_s": round(compile_s, 2),
        "images_per_s": bs / (step + data_t),
        "ms_per_step": 1000 * (step + data_t),
        "train_step_ms": 1000 * step,
        "ms_per_update": 1000 * (step + data_t) / trainer.replays,
        "breakdown_ms": {
            "attack": 1000 * essential["attack"],
            "g_update": 1000 * essential["g"],
            "f_update": 1000 * essential["f"],
            "data": 1000 * data_t,
            # negative where the passes timed alone took longer than inside the step (noise)
            "other": 1000 * (step - essential_s),
        },
        "data_share": data_t / (step + data_t),
        "essential_ms": 1000 * essential_s,
        "overhead_ratio": step / essential_s if essential_s else None,
        "peak_mem_mb": round(peak_mb, 1),
        "iters": spec.iters,
        "clock": spec.clock,
    }
    del trainer, batches
    if spec.reference:
        ref = time_reference(cfg, x.contiguous(), y, spec.reference_iters)
        result["reference_ms_per_step"] = 1000 * ref
        result["reference_images_per_s"] = bs / ref
        result["speedup_vs_reference"] = ref / (step + data_t)
        result["reference_method"] = cfg.method  # (--all: every row against ACT's)
    if spec.flops:
        flops = model_flops_per_step(cfg, x, y)
        peak = matmul_tflops(device, autocast_dtype(result["precision"]) or torch.float32)
        result["model_gflop_per_step"] = flops / 1e9
        result["model_tflops"] = flops / (step + data_t) / 1e12
        result["matmul_tflops"] = peak
        result["matmul_share"] = result["model_tflops"] / peak
    result["env"] = environment(device, threads)
    return result


def time_reference(cfg: TrainConfig, x: Tensor, y: Tensor, iters: int) -> float:
    """Median seconds of the plain fp32 NCHW step of ``cfg.method`` on the batch (x, y)."""
    info = D.get_dataset_info(cfg.dataset)
    ref = PlainReference(cfg, info.in_channels, info.num_classes or 1000)
    x = x.float().contiguous()
    return _timed(lambda: ref.step(x, y), iters, ref.device)


def model_flops_per_step(cfg: TrainConfig, x: Tensor, y: Tensor) -> float:
    """FLOPs of one training step of ``cfg`` on the batch (x, y), counted with PyTorch's
    per-operator FLOP formulas on the plain reference step (convolutions and matrix products,
    forward and backward, attack passes included): the method's work whatever implementation
    runs it, so FLOPs / step time compares with the hardware's matrix rate. Counted on two
    images and scaled (the count is linear in the batch), so that it costs almost nothing."""
    # FlopCounterMode itself tracks modules with backward hooks, which autograd.grad w.r.t. a
    # leaf (the attack's input gradient) rejects; only its formulas are used here.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    formulas = FlopCounterMode(display=False).flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    info = D.get_dataset_info(cfg.dataset)
    ref = PlainReference(cfg, info.in_channels, info.num_classes or 1000)
    n = min(2, len(x))
    with Count() as counter:
        ref.step(x[:n].float().contiguous(), y[:n])
    return counter.total * len(x) / n


def matmul_tflops(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """The rate of a large square matrix product in ``dtype`` on ``device`` (TFLOP/s, median
    of ``reps``): the ceiling a training step's FLOPs are compared with."""
    n = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    seconds = _timed(lambda: torch.mm(a, b), reps, device)
    return 2 * n**3 / seconds / 1e12


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "malloc": malloc_in_use(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    return env


def interleaved_step_ms(specs: list[BenchSpec], rounds: int, block: int = 2) -> list[float]:
    """Median milliseconds per training step of each spec, timed in rounds within one
    process: in every round each spec runs one untimed step (its models, optimiser state and
    activations back in the caches, as in a real run, where nothing else runs in between)
    and then ``block`` timed ones. Drift in the machine's state (other processes, clock
    speed) then hits every spec alike, which separate runs cannot promise; steps of
    different specs back to back would instead charge each one the others' cache misses.
    This is how the benchmark compares methods (ACT vs Madry)."""
    _use_clock_and_threads(specs[0])
    runs = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        trainer = synthetic_trainer(spec.train_config())
        runs.append((trainer, endless_batches(trainer.data.train)))
    device = runs[0][0].device
    times: list[list[float]] = [[] for _ in specs]
    for _ in range(rounds):
        for i, (trainer, batches) in enumerate(runs):
            for k in range(1 + block):
                x, y = next(batches)
                _sync(device)
                t0 = _clock()
                trainer.train_step(x, y)
                _sync(device)
                if k > 0:
                    times[i].append(_clock() - t0)
    return [1000 * statistics.median(t) for t in times]


# ---- evaluation ---------------------------------------------------------------------------------


def run_eval_bench(spec: BenchSpec) -> dict[str, Any]:
    """``actrain bench --eval``: PGD-k evaluation throughput of ``spec``'s model, as
    ``actrain eval`` runs it (NCHW fp32 model, one restart, verdicts in fp32), with the input
    gradients from the model in fp32 (the plain path) and from its BN-folded copy
    (``runtime.gradient_model``) in ``spec.precision`` (auto: fp32, the evaluation default),
    in alternating rounds of one process. Random weights with batch-norm statistics like a
    trained model's; the labels are the model's own predictions and early stopping is off, so
    every image is attacked for all k steps and the time measures the attack, not the model's
    accuracy."""
    threads = _use_clock_and_threads(spec)
    cfg = spec.train_config()
    device = T.resolve_device(cfg.device)
    info = D.get_dataset_info(cfg.dataset)
    torch.manual_seed(spec.seed)
    kw = T.model_kwargs(cfg, "g", info, info.num_classes or 1000)
    model = create_model(**kw).to(device).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = synthetic_images(info, spec.batch_size, 1, spec.seed).images.float().div(255).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    from actrain.evaluation import protocols as P
    from actrain.evaluation.protocols import robust_accuracy

    precision = "fp32" if spec.precision == "auto" else spec.precision

    def attack(fold: bool) -> Callable[[], dict[str, Any]]:
        return lambda: robust_accuracy(
            model, x, y, steps=spec.steps, restarts=1, early_stop=False,
            batch_size=spec.batch_size, fold_bn=fold, precision=precision if fold else "fp32",
        )  # fmt: skip

    results = {fold: attack(fold)() for fold in (False, True)}  # warm-up; the answers
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(spec.iters):
        for fold in (False, True):
            times[fold].append(_timed(attack(fold), 1, device, warm=False))
    seconds = {fold: statistics.median(t) for fold, t in times.items()}
    rate = {fold: spec.batch_size / s for fold, s in seconds.items()}
    return {
        "mode": "eval",
        "arch": cfg.arch,
        "width": cfg.width,
        "dataset": cfg.dataset,
        "batch_size": spec.batch_size,
        "steps": spec.steps,
        "precision": precision,
        "images_per_s": rate[True],
        "images_per_s_plain_gradients": rate[False],
        "speedup": rate[True] / rate[False],
        # what `actrain eval` does without flags: fp32 gradients, folded where that is the default
        "default_gradients": P.gradients_label(model, eval_fold_bn_default(device), "fp32"),
        "robust_acc": {
            "folded": results[True]["robust_acc"],
            "plain": results[False]["robust_acc"],
        },
        "ms_per_batch": {"folded": 1000 * seconds[True], "plain": 1000 * seconds[False]},
        "clock": spec.clock,
        "env": environment(device, threads),  # the key the training rows use
    }


def format_eval_line(r: dict[str, Any]) -> str:
    return (
        f"eval PGD-{r['steps']} {_model_label(r)} batch {r['batch_size']}:"
        f" {r['images_per_s']:.1f} img/s with BN-folded {r['precision']} gradients,"
        f" {r['images_per_s_plain_gradients']:.1f} img/s with the model's fp32 ones"
        f" ({r['speedup']:.2f}x);"
        f" robust acc {r['robust_acc']['folded']:.1f} / {r['robust_acc']['plain']:.1f} %;"
        f" default here: {r['default_gradients']}"
    )


# ---- the matrix --------------------------------------------------------------------------------

ALL_WIDTHS = (16, 64)
ALL_METHODS = ("natural", "madry", "trades", "act")


def run_all(base: BenchSpec, widths=ALL_WIDTHS, log=print) -> list[dict[str, Any]]:
    """Every method at every width with ``base``'s other settings, plus an ACT row with the
    fast-path levers off (precision fp32, NCHW, no folding) for comparison at widths < 32. The
    plain reference (ACT) is timed once per width. Widths >= 32 (and fixed-size models, width
    None) use half the timed steps and one warm-up. ``vs_madry`` comes from each method's
    steps and Madry's, timed in interleaved rounds in one process (:func:`interleaved_step_ms`:
    ``iters`` rounds, at least 3, of 2 timed steps each), two trainers at a time as a real run
    holds one. Natural training has no rows with FGSM-RS or Free-AT (no attack to change)."""
    rows: list[dict[str, Any]] = []
    methods = ["act", "madry", "trades", "natural"]
    if base.train_attack != "pgd":
        methods.remove("natural")
    for width in widths:
        first_row = len(rows)
        ref_row = None
        spec_w = base
        if width is None or width >= 32:  # full-size models: fewer repetitions
            spec_w = BenchSpec(
                **{**asdict(base), "iters": max(2, base.iters // 2), "warmup": min(base.warmup, 1)}
            )
        for method in methods:
            spec = BenchSpec(**{**asdict(spec_w), "method": method, "width": width})
            spec.reference = method == "act" and base.reference
            row = run_bench(spec)
            if ref_row is None:
                ref_row = row
            log(format_line(row))
            rows.append(row)
        if width is not None and width < 32:  # at full width the plain reference says the same
            plain = BenchSpec(**{**asdict(spec_w), "width": width, "precision": "fp32"})
            plain.channels_last, plain.fold_bn, plain.reference = False, False, False
            plain.fused_bn, plain.cuda_graphs = False, False
            row = run_bench(plain)
            log(format_line(row))
            rows.append(row)
        ref_ms = ref_row.get("reference_ms_per_step")
        paired = {}  # method -> (its step, Madry's step), timed in interleaved rounds
        rounds = max(3, spec_w.iters)
        for method in (m for m in methods if m != "madry"):
            specs = [
                BenchSpec(**{**asdict(spec_w), "method": m, "width": width})
                for m in (method, "madry")
            ]
            paired[method] = interleaved_step_ms(specs, rounds)
            log(
                f"interleaved, {_model_label(ref_row)}: {method} {paired[method][0]:.0f} ms,"
                f" madry {paired[method][1]:.0f} ms"
                f" -> {paired[method][0] / paired[method][1]:.3f}x Madry"
            )
        madry = next(r for r in rows[first_row:] if r["method"] == "madry")
        for r in rows[first_row:]:
            if ref_ms:
                r["reference_ms_per_step"] = ref_ms
                r["speedup_vs_reference"] = ref_ms / r["ms_per_step"]
                r["reference_method"] = "act"
            if r["precision"] == madry["precision"]:
                mine, theirs = paired.get(r["method"], (1.0, 1.0))
                if r["method"] != "madry":
                    r["interleaved_ms_per_step"] = {r["method"]: mine, "madry": theirs}
                r["vs_madry"] = mine / theirs
    return rows


def _fold_shown(r: dict[str, Any]) -> bool:
    """Whether a row's attack passes ran on the BN-folded view (natural training has none)."""
    return bool(r["fold_bn"]) and r.get("attack_passes", 1) > 0


def _model_label(r: dict[str, Any]) -> str:
    """``resnet18 w16``, or the architecture alone where it has a fixed size."""
    return r["arch"] + (f" w{r['width']}" if r.get("width") is not None else "")


def attack_label(r: dict[str, Any]) -> str:
    """``K=10`` for PGD training, ``fgsm-rs``, ``free m=4``."""
    attack = r.get("train_attack", "pgd")
    if r["method"] == "natural":
        return "no attack"
    if attack == "pgd":
        return f"K={r['steps']}"
    return f"free m={r['replays']}" if attack == "free" else attack


def format_line(r: dict[str, Any]) -> str:
    b = r["breakdown_ms"]
    compiled = f" (compiled in {r['compile_s']:.0f} s)" if r["compile"] else ""
    fold = _fold_shown(r)
    per_update = ""
    if r.get("replays", 1) > 1:
        per_update = f" ({r['ms_per_update']:.0f} ms/update)"
    text = (
        f"{r['method']:<7} {_model_label(r)} {r.get('dataset', '')} bs{r['batch_size']}"
        f" {attack_label(r)}"
        f" {r['precision']}{' CL' if r['channels_last'] else ''}"
        f"{' fold' if fold else ''}{' im2col' if r.get('im2col') else ''}"
        f"{' mmWgrad' if r.get('mm_wgrad') else ''}"
        f"{' fusedBN' if r.get('fused_bn') else ''}"
        f"{' graphs' if r.get('cuda_graphs') else ''}"
        f"{' stepGraph' if r.get('step_graph') else ''}"
        f"{' streams' if r.get('model_streams') else ''}"
        f"{' compile' if r['compile'] else ''}"
        f"{' ' + r['compile_mode'] if r.get('compile_mode') else ''}{compiled}:"
        f" {r['images_per_s']:.1f} img/s, {r['ms_per_step']:.0f} ms/step{per_update}"
        f" (attack {b['attack']:.0f}, G {b['g_update']:.0f}, F {b['f_update']:.0f},"
        f" data {b['data']:.1f}, other {b['other']:.0f} ms; step/essential"
        f" {r['overhead_ratio']:.3f}), peak {r['peak_mem_mb']:.0f} MiB"
    )
    if r.get("model_tflops"):
        text += (
            f"; {r['model_tflops']:.2f} model TFLOP/s ({100 * r['matmul_share']:.0f}% of a"
            f" {r['precision']} matmul's {r['matmul_tflops']:.1f})"
        )
    if r.get("speedup_vs_reference"):
        text += (
            f"; plain fp32 reference {r['reference_ms_per_step']:.0f} ms/step"
            f" -> {r['speedup_vs_reference']:.2f}x"
        )
    return text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | width | precision | fast path | img/s | ms/step | attack | G | F | data | "
        "other | step/essential | peak MiB | TFLOP/s (of matmul) | vs plain ref | vs Madry |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        b = r["breakdown_ms"]
        fold = _fold_shown(r)
        levers = [s for s, on in (("CL", r["channels_last"]), ("fold", fold)) if on]
        if r.get("im2col"):
            levers.append("im2col")
        if r.get("mm_wgrad"):
            levers.append("mmWgrad")
        if r.get("fused_bn"):
            levers.append("fusedBN")
        if r.get("cuda_graphs"):
            levers.append("graphs")
        if r.get("step_graph"):
            levers.append("stepGraph")
        if r.get("model_streams"):
            levers.append("streams")
        if r["compile"]:
            levers.append("compile")
        ref, mad = r.get("speedup_vs_reference"), r.get("vs_madry")
        tflops = "-"
        if r.get("model_tflops"):
            tflops = f"{r['model_tflops']:.2f} ({100 * r['matmul_share']:.0f}%)"
        attack = attack_label(r)
        plain = attack.startswith("K=") or r["method"] == "natural"
        label = r["method"] if plain else f"{r['method']} {attack}"
        width = "-" if r["width"] is None else r["width"]
        lines.append(
            f"| {label} | {width} | {r['precision']} | {'+'.join(levers) or '-'} "
            f"| {r['images_per_s']:.1f} | {r['ms_per_step']:.0f} | {b['attack']:.0f} "
            f"| {b['g_update']:.0f} | {b['f_update']:.0f} | {b['data']:.1f} | {b['other']:.0f} "
            f"| {r['overhead_ratio']:.3f} | {r['peak_mem_mb']:.0f} | {tflops} "
            f"| {f'{ref:.2f}x' if ref else '-'} | {f'{mad:.2f}x' if mad else '-'} |"
        )
    refs = {r["width"]: r["reference_ms_per_step"] for r in rows if r.get("reference_ms_per_step")}
    paired = [(r["width"], r["method"], r.get("interleaved_ms_per_step")) for r in rows]
    foot = "".join(
        f"\nvs Madry, width {w}: {m} {ms[m]:.0f} ms/step vs Madry {ms['madry']:.0f}"
        " (interleaved rounds)."
        for w, m, ms in paired
        if ms
    )
    foot += "".join(
        f"\nPlain fp32 NCHW reference ACT step, width {w}: {ms:.0f} ms/step"
        f" ({rows[0]['batch_size'] / ms * 1000:.1f} img/s)."
        for w, ms in refs.items()
    )
    env, last = rows[0]["env"], rows[-1]["env"]
    first = rows[0]
    attack = "PGD" if first.get("train_attack", "pgd") == "pgd" else first["train_attack"]
    foot += (
        f"\nModel {first['arch']}, {first.get('dataset', '?')}-shaped data, batch"
        f" {first['batch_size']}, training attack {attack} ({attack_label(first)})."
    )
    foot += (
        f"\nClock: {rows[0]['clock']} time; {env['threads']} thread(s); {env['device']}"
        f" ({env.get('gpu', env['cpu'])}), torch {env['torch']}, malloc"
        f" {env.get('malloc', 'system')}; 1-min load average"
        f" {env['load_avg_1m']} at the first row, {last['load_avg_1m']} at the last."
    )
    return head + "\n".join(lines) + "\n\n" + foot.lstrip("\n") + "\n"
