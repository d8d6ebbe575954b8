"""Run configuration: one dataclass, YAML files, flag overrides and validation.

Everything a run needs is in :class:`TrainConfig`, so the resolved config saved in the run
folder is enough to rebuild the models, the data and the exact training recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

METHODS = ("natural", "madry", "trades", "act")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTACK_KL_REDUCTIONS = ("sum", "mean")
ATTACK_STARTS = ("auto", "gaussian", "uniform", "zero")
TRAIN_ATTACKS = ("pgd", "fgsm-rs", "free")  # issue 8; see actrain.attacks.training
FREE_REPLAYS = 4  # Free-AT's m when --replays is not given (Shafahi et al.'s ImageNet choice)
FGSM_RS_STEP = 1.25  # FGSM-RS step as a multiple of eps (Wong et al.)


from actrain.errors import ConfigError  # noqa: E402  (re-exported: actrain.config.ConfigError)


def parse_fraction(value: Any, name: str = "value") -> float:
    """Accept numbers and strings such as ``8/255`` or ``0.031`` for eps and step sizes."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number or fraction such as 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{name}: expected a number or fraction such as 8/255, got {value!r}"
        ) from None


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. Defaults reproduce the paper's CIFAR-10 ACT set-up,
    with the authors' released code where the paper is silent or literal Eq. 1-2 differ from it:
    the mimicry KL at temperature 4 scaled by T^2 (``temperature=1`` gives Eq. 1-2), the
    attack's KL summed over the batch, weight decay 5e-4 (README: Differences from the paper)."""

    method: str = "act"
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = True
    arch: str = "resnet18"
    width: int | None = None
    arch_f: str | None = None  # ACT: F may differ from G; None = same as G
    width_f: int | None = None
    depth: int | None = None
    widen_factor: int | None = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 2e-4 for TRADES (its recipe), else 5e-4
    milestones: list[int] | None = None  # None: 30%, 60%, 75% of epochs (paper: 60/120/150)
    gamma: float = 0.2
    alpha: float = 0.9
    beta: float = 5.0
    temperature: float = 4.0
    attack_temperature: float = 1.0
    attack_kl_reduction: str = "sum"
    attack_start: str = "auto"
    eps: float = 0.031
    # Not given: 0.007 for PGD, 1.25 eps for FGSM-RS, eps for Free-AT (resolved by build_config)
    step_size: float = 0.007
    steps: int = 10  # PGD's K (FGSM-RS takes one step, Free-AT none of its own)
    # issue 8: the attack of every adversarial method, and Free-AT's replays of a mini-batch.
    # With --replays m the trainer runs ceil(epochs / m) passes over the data and each
    # milestone M becomes ceil(M / m): `epochs` stays the budget in epochs of cost.
    train_attack: str = "pgd"
    replays: int = 1  # not given with --train-attack free: 4
    # Catastrophic-overfitting guard (Wong et al.): PGD accuracy of G on a fixed held-out batch
    # after each epoch; a drop of more than `threshold` points below the best stops the run
    # and keeps the best weights. None: on for fgsm-rs, off otherwise.
    overfit_guard: bool | None = None
    overfit_guard_threshold: float = 20.0  # percentage points
    overfit_guard_size: int = 256  # images of the evaluation set (class-balanced, fixed)
    overfit_guard_steps: int = 10  # PGD steps (step 2.5 eps / steps, one fixed random start)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    # The eval-mode attack passes on a copy of G with batch norm folded into its convs
    # (runtime.AttackView); None: on in bf16/fp16, and in fp32 where runtime.fp32_levers_pay.
    fold_bn: bool | None = None
    # actrain's own CPU kernels for bf16 (actrain.fused: batch norm + add + ReLU, the residual
    # gradient sums, the attack passes' conv + add + ReLU; the weight-gradient matmuls of
    # actrain.im2col); None: on for bf16 channels_last on a CPU where they build.
    fused_bn: bool | None = None
    # PGD training attacks replayed from CUDA graphs (actrain.attacks.graphed); None: on CUDA.
    cuda_graphs: bool | None = None
    # ACT inside the update graph: F's passes on a second CUDA stream, so that F's backward
    # runs beside G's on a GPU that one model at batch 128 leaves half idle. None: on there.
    model_streams: bool | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    val_size: int = 0
    eval_every: int = 1
    eval_size: int = 500
    eval_steps: int = 10
    eval_step_size: float | None = None
    num_workers: int = 4
    out: str | None = None
    progress: bool = True
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    nan_policy: str = "stop"  # stop | skip
    deterministic: bool = False
    # torchrun (issue 5): batch_size is per process; see docs/distributed.md
    sync_bn: bool = False  # batch-norm statistics over the global batch
    scale_lr: bool = False  # lr x number of processes (off: the paper keeps 0.1 at 4 x 128)
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU), nccl or gloo

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Flags that may change when a run is resumed; anything else must match the saved config.
RESUMABLE_CHANGES = {
    "epochs",
    "device",
    "progress",
    "eval_every",
    "eval_size",
    "num_workers",
    "out",
    "checkpoint_every",
    "nan_policy",
    "data_dir",
    "deterministic",
    "cuda_graphs",
    "model_streams",
    # torchrun (issue 5): a run may resume on another number of processes, so the per-process
    # batch may change with it (the position in an epoch is converted by examples seen)
    "batch_size",
    "sync_bn",
    "dist_backend",
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# The yes/no settings and the train flags that set them on and off (None: no flag, the default).
ON_OFF_FLAGS: dict[str, tuple[str | None, str | None]] = {
    name: (f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}")
    for name in (
        "channels_last",
        "fold_bn",
        "fused_bn",
        "cuda_graphs",
        "model_streams",
        "overfit_guard",
    )
} | {
    "download": (None, "--no-download"),
    "deterministic": ("--deterministic", None),
    "sync_bn": ("--sync-bn", None),
    "scale_lr": ("--scale-lr", None),
}
FRACTION_FIELDS = ("eps", "step_size", "eval_step_size")


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; bad YAML and unknown keys are user errors, named precisely."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config: {p} is a folder; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {p}: invalid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not a text file (expected YAML)") from None
    if data is None:  # empty, or comments only: a truncated file would train the defaults
        raise ConfigError(f"--config {p}: the file sets no option (expected option: value lines)")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        hints = "".join(_did_you_mean(k, list(FIELDS)) for k in unknown[:1])
        raise ConfigError(f"--config {p}: unknown keys: {', '.join(sorted(unknown))}{hints}")
    return data


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Merge defaults < config file < explicit flags, then validate (two mappings: a config
    file's values, e.g. :func:`load_yaml`, and the overrides)."""
    for name, given in (("file_values", file_values), ("overrides", overrides)):
        if not isinstance(given, Mapping):
            raise TypeError(
                f"build_config: {name} must be a mapping, got {type(given).__name__}"
                " (for a file: build_config(load_yaml(path), overrides))"
            )
    values: dict[str, Any] = {}
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("train_attack"), str):
        values["train_attack"] = values["train_attack"].strip().lower().replace("_", "-")
    for key in FRACTION_FIELDS:
        if values.get(key) is not None:
            values[key] = parse_fraction(values[key], "--" + key.replace("_", "-"))
    if isinstance(values.get("milestones"), str):
        values["milestones"] = _parse_int_list(values["milestones"])
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if cfg.weight_decay is None:
        cfg.weight_decay = default_weight_decay(cfg.method)
    if cfg.milestones is None and isinstance(cfg.epochs, int) and cfg.epochs > 0:
        cfg.milestones = paper_milestones(cfg.epochs)
    _attack_defaults(cfg, given=set(values))
    validate(cfg)
    return cfg


def _attack_defaults(cfg: TrainConfig, given: set[str]) -> None:
    """Defaults that depend on the training attack, for the options the user did not give.

    The resolved values are what the run folder's config.json records, so a resumed run (whose
    saved config gives every option) keeps them.
    """
    if cfg.train_attack == "free" and "replays" not in given:
        cfg.replays = FREE_REPLAYS
    if "step_size" not in given:
        if cfg.train_attack == "fgsm-rs":
            cfg.step_size = FGSM_RS_STEP * cfg.eps
        elif cfg.train_attack == "free":
            cfg.step_size = cfg.eps
    if cfg.train_attack != "pgd" and cfg.eval_step_size is None and cfg.eval_steps > 0:
        # The training step (1.25 eps, eps) would make a poor PGD-K; use Madry's 2.5 eps / K.
        cfg.eval_step_size = 2.5 * cfg.eps / cfg.eval_steps


def scheduled_epochs(cfg: TrainConfig) -> int:
    """Passes over the data the trainer runs: ``epochs`` divided by Free-AT's replays (each
    pass costs m epochs of updates), rounded up; ``epochs`` itself for the other attacks."""
    return -(-cfg.epochs // max(cfg.replays, 1))


def scheduled_milestones(cfg: TrainConfig) -> list[int]:
    """The learning-rate milestones in passes: ceil(M / replays) for each milestone M, as
    Shafahi et al. scale their schedule. Two that fall on one pass both apply there."""
    m = max(cfg.replays, 1)
    return [-(-int(ms) // m) for ms in (cfg.milestones or [])]


def overfit_guard_on(cfg: TrainConfig) -> bool:
    """Whether the catastrophic-overfitting guard runs (auto: with FGSM-RS training)."""
    if cfg.overfit_guard is None:
        return cfg.train_attack == "fgsm-rs"
    return bool(cfg.overfit_guard)


def eval_step(cfg: TrainConfig) -> float:
    """Step of the PGD evaluations during training (``--eval-step-size``, else the training
    step as it always was for PGD training)."""
    return cfg.eval_step_size if cfg.eval_step_size is not None else cfg.step_size


def _coerce(key: str, value: Any) -> Any:
    """Give YAML/flag values the field's type, or name the field that is wrong."""
    if key not in FIELDS:
        raise ConfigError(f"unknown option '{key}'{_did_you_mean(key, list(FIELDS))}")
    kind = str(FIELDS[key].type)
    flag = "--" + key.replace("_", "-")
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{flag}: a value is required")
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return low in ("true", "yes", "1")
            return bool(value)
        if kind.startswith(("int", "float", "list")) and isinstance(value, bool):
            raise ValueError  # YAML's yes/true is no number (int(True) would be 1)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return parse_fraction(value, flag)
        if kind.startswith("list"):
            if isinstance(value, (int, str)):
                value = _parse_int_list(str(value))
            return [int(v) for v in value]
        if kind.startswith("str"):
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: invalid value {value!r} (expected {kind})") from None
    return value


RUN_CONFIG_KEYS = frozenset(("method", "dataset", "arch", "epochs"))


def is_run_config(path: str | Path) -> bool:
    """Whether ``path`` is a run's config.json as actrain writes it (a JSON object with a
    run's keys), not another program's file of that name in a folder given as ``--out``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and RUN_CONFIG_KEYS <= data.keys()


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config, with only the changes that are safe on resume."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "it is a file, not a run folder" if run_dir.exists() else "no such folder"
        raise ConfigError(f"--resume: no checkpoint in {run_dir}: {what}")
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(
            f"--resume: no checkpoint in {run_dir} (expected {run_dir}/checkpoint.pt)"
            + (
                "; the run stopped before its first one: start it again without --resume"
                if is_run_config(run_dir / "config.json")
                else "; it is not a run folder"
            )
        )
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {run_dir}/config.json is missing or unreadable") from None
    overrides = {k: _coerce_given(k, v) for k, v in overrides.items()}
    changed = {
        k: (saved.get(k), v)
        for k, v in overrides.items()
        if v is not None and k in saved and saved.get(k) != v and k not in RESUMABLE_CHANGES
    }
    if changed:
        diffs = ", ".join(
            f"{k}: saved {a!r} vs given {b!r}" for k, (a, b) in sorted(changed.items())
        )
        raise ConfigError(
            f"--resume: config differs from the saved run ({diffs}); only"
            f" {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )
    allowed = {k: v for k, v in overrides.items() if k in RESUMABLE_CHANGES and v is not None}
    saved_ms = list(saved.get("milestones") or [])
    if "epochs" in allowed and saved_ms and saved_ms[-1] > allowed["epochs"]:
        # (build_config's own message suggests --milestones, which a resume cannot change)
        raise ConfigError(
            f"--resume --epochs {allowed['epochs']}: the run's lr milestones {saved_ms} lie"
            f" beyond it; resume with --epochs {saved_ms[-1]} or more, or train a new run"
        )
    cfg = build_config(saved, allowed)
    cfg.out = str(run_dir)
    return cfg


def _coerce_given(key: str, value: Any) -> Any:
    if value is None or key not in FIELDS:
        return value
    if key in FRACTION_FIELDS:
        return parse_fraction(value, "--" + key.replace("_", "-"))
    return _coerce(key, value)


def default_weight_decay(method: str) -> float:
    """TRADES' recipe uses 2e-4; Madry, ACT and natural training use 5e-4."""
    return 2e-4 if method == "trades" else 5e-4


def paper_milestones(epochs: int) -> list[int]:
    """The paper's 60/120/150 of 200 epochs, scaled to any length (30%, 60%, 75%)."""
    ms = sorted({max(1, round(epochs * f)) for f in (0.3, 0.6, 0.75)})
    return [m for m in ms if m < epochs]


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(
            f"--milestones: expected integers such as 60 120 150, got {text!r}"
        ) from None


def validate(cfg: TrainConfig) -> None:
    """Catch every mistake before data is loaded or time is spent."""
    if cfg.method not in METHODS:
        raise ConfigError(
            f"--method: unknown method '{cfg.method}'{_did_you_mean(cfg.method, METHODS)}"
            f" (choices: {', '.join(METHODS)})"
        )
    from actrain.data.registry import check_data_dir, get_dataset_info
    from actrain.models import ARCHITECTURES

    get_dataset_info(cfg.dataset)  # raises DataError with a "did you mean"
    arches = list(ARCHITECTURES)
    registry = sys.modules.get("actrain.models.registry")  # loaded: models may be registered
    if registry is not None:
        arches += [a for a in registry.list_models() if a not in arches]
    for flag, arch in (("--arch", cfg.arch), ("--arch-f", cfg.arch_f)):
        if arch is not None and arch not in arches:
            raise ConfigError(
                f"{flag}: unknown architecture '{arch}'{_did_you_mean(arch, arches)}"
                f" (choices: {', '.join(arches)})"
            )
    check_data_dir(cfg.data_dir, cfg.dataset)
    for name in ("eps", "step_size"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be in [0, 1], got {v}")
    if cfg.eval_step_size is not None and not 0 <= cfg.eval_step_size <= 1:
        raise ConfigError(f"--eval-step-size: must be in [0, 1], got {cfg.eval_step_size}")
    if not 0 <= cfg.alpha <= 1:
        raise ConfigError(f"--alpha: must be in [0, 1], got {cfg.alpha}")
    if cfg.beta < 0:
        raise ConfigError(f"--beta: must be >= 0, got {cfg.beta}")
    if cfg.temperature <= 0 or cfg.attack_temperature <= 0:
        raise ConfigError("--temperature: must be > 0")
    if cfg.steps < 0 or cfg.eval_steps < 0:
        raise ConfigError(f"--steps: must be >= 0, got {cfg.steps}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {cfg.batch_size}")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {cfg.epochs}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr: must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight-decay: must be >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum: must be in [0, 1), got {cfg.momentum}")
    if cfg.gamma <= 0:
        raise ConfigError(f"--gamma: must be > 0, got {cfg.gamma}")
    for name in ("width", "width_f", "depth", "widen_factor"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    _validate_model_flags(cfg)
    _validate_method_flags(cfg)
    if cfg.dataset == "imagefolder":  # streamed from train/ and val/, as they are
        for name, what in (
            ("train_subset", "it trains on every image of train/: make a smaller folder"),
            ("val_size", "it evaluates on val/; --eval-size sets how many of them"),
            ("test_subset", "it evaluates on val/; --eval-size sets how many of them"),
        ):
            if getattr(cfg, name):
                raise ConfigError(
                    f"--{name.replace('_', '-')}: not for --dataset imagefolder; {what}"
                )
    if not 0 <= cfg.seed < 2**32:  # NumPy's seed range, which seeds the data order
        raise ConfigError(f"--seed: must be in 0..2**32 - 1, got {cfg.seed}")
    ms = list(cfg.milestones or [])
    if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ConfigError(f"--milestones: must be strictly increasing, got {ms}")
    if ms and (ms[0] < 1 or ms[-1] > cfg.epochs):
        fit = " ".join(map(str, paper_milestones(cfg.epochs))) or "with no value"
        raise ConfigError(
            f"--milestones: must lie in 1..epochs ({cfg.epochs}), got {ms} (the paper's"
            f" schedule for {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}: --milestones {fit})"
        )
    if cfg.precision not in PRECISIONS:
        raise ConfigError(
            f"--precision: must be one of {', '.join(PRECISIONS)}, got {cfg.precision}"
        )
    if cfg.attack_kl_reduction not in ATTACK_KL_REDUCTIONS:
        raise ConfigError(
            f"--attack-kl-reduction: must be one of {', '.join(ATTACK_KL_REDUCTIONS)},"
            f" got {cfg.attack_kl_reduction}"
        )
    if cfg.attack_start not in ATTACK_STARTS:
        raise ConfigError(
            f"--attack-start: must be one of {', '.join(ATTACK_STARTS)}, got {cfg.attack_start}"
        )
    for name in ("train_subset", "test_subset"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    if cfg.val_size < 0 or cfg.eval_size < 0:
        raise ConfigError("--val-size/--eval-size: must be >= 0")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every: must be >= 0, got {cfg.checkpoint_every}")
    if cfg.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"--nan-policy: must be stop or skip, got {cfg.nan_policy}")
    if cfg.eval_every < 0:
        raise ConfigError(f"--eval-every: must be >= 0, got {cfg.eval_every}")
    if cfg.dist_backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"--dist-backend: must be auto, nccl or gloo, got {cfg.dist_backend}")
    _validate_attack(cfg)


# architectures that take --width (channels of the first stage) and --depth/--widen-factor
WIDTH_ARCHES = ("resnet18", "preact_resnet18", "small_cnn")
DEPTH_ARCHES = ("wideresnet",)


def _validate_model_flags(cfg: TrainConfig) -> None:
    """A model flag the architecture does not take was ignored and still recorded in
    config.json, splitting otherwise identical runs into two configurations."""
    arch_f = cfg.arch_f or cfg.arch
    for flag, value, arches, takes in (
        ("--width", cfg.width, (cfg.arch,), WIDTH_ARCHES),
        ("--width-f", cfg.width_f, (arch_f,), WIDTH_ARCHES),
        ("--depth", cfg.depth, (cfg.arch, arch_f), DEPTH_ARCHES),
        ("--widen-factor", cfg.widen_factor, (cfg.arch, arch_f), DEPTH_ARCHES),
    ):
        if value is not None and not any(a in takes for a in arches):
            raise ConfigError(
                f"{flag}: {' / '.join(dict.fromkeys(arches))} does not take it (only"
                f" {', '.join(takes)} {'does' if len(takes) == 1 else 'do'}; wrn-28-10 and"
                " wrn-34-10 are fixed)"
            )


# Settings one method alone reads: given to another method they were ignored and still
# recorded, splitting otherwise identical runs into two configurations in reports.
METHOD_ONLY = {
    "act": ("arch_f", "width_f", "alpha", "temperature", "attack_temperature",
            "attack_kl_reduction"),
    "trades": ("beta",),
}  # fmt: skip


def _validate_method_flags(cfg: TrainConfig) -> None:
    for method, names in METHOD_ONLY.items():
        if cfg.method == method:
            continue
        for name in names:
            value = getattr(cfg, name)
            if value != FIELDS[name].default:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value}: only --method {method} uses it (this"
                    f" run is --method {cfg.method}); leave it out"
                )


def _validate_attack(cfg: TrainConfig) -> None:
    """The training attack, Free-AT's replays and the overfitting guard (issue 8)."""
    if cfg.train_attack not in TRAIN_ATTACKS:
        raise ConfigError(
            f"--train-attack: unknown attack '{cfg.train_attack}'"
            f"{_did_you_mean(cfg.train_attack, TRAIN_ATTACKS)}"
            f" (choices: {', '.join(TRAIN_ATTACKS)})"
        )
    if cfg.method == "natural":  # settings of the attack it does not run
        for flag, value, default in (
            ("--train-attack", cfg.train_attack, "pgd"),
            ("--attack-start", cfg.attack_start, "auto"),
        ):
            if value != default:
                raise ConfigError(
                    f"{flag} {value}: natural training uses no adversarial examples"
                    " (use --method madry, trades or act)"
                )
    if cfg.replays < 1:
        raise ConfigError(f"--replays: must be >= 1, got {cfg.replays}")
    if cfg.replays != 1 and cfg.train_attack != "free":
        raise ConfigError(
            f"--replays: only --train-attack free replays mini-batches"
            f" (got --train-attack {cfg.train_attack})"
        )
    if cfg.train_attack == "free" and cfg.attack_start != "auto":
        raise ConfigError(
            f"--attack-start {cfg.attack_start}: does not apply to --train-attack free (its"
            " perturbation starts at zero and is carried over between mini-batches)"
        )
    if not 0 < cfg.overfit_guard_threshold <= 100:
        raise ConfigError(
            "--overfit-guard-threshold: must be in (0, 100] percentage points,"
            f" got {cfg.overfit_guard_threshold}"
        )
    if cfg.overfit_guard_size < 1:
        raise ConfigError(f"--overfit-guard-size: must be >= 1, got {cfg.overfit_guard_size}")
    if cfg.overfit_guard_steps < 1:
        raise ConfigError(f"--overfit-guard-steps: must be >= 1, got {cfg.overfit_guard_steps}")
