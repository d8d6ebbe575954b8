"""Run-folder level evaluation: the single-attack command, the paper suite, transfer matrices.

Every result carries ``indices`` (the evaluated test examples, positions in the test split's
standard order) and the exact settings of each attack.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from actrain import data as D
from actrain.checkpoint import CheckpointError, load_model, read_weights_metadata, run_config
from actrain.config import ConfigError, parse_fraction
from actrain.errors import UsageError
from actrain.evaluation import protocols as P
from actrain.evaluation.report import attack_variant
from actrain.evaluation.sanity import sanity_checks
from actrain.runtime import resolve_device

SUITES = ("basic", "paper", "sanity")
ATTACKS = ("pgd", "fgsm", "autoattack")


@dataclass
class EvalOptions:
    """Everything that determines an evaluation's numbers (stored in the JSON)."""

    eps: float = 8 / 255
    step_size: float | None = None  # None: P.pgd_step_size (0.003 unless too small for eps)
    steps: int = 20
    restarts: int = 5
    loss: str = "ce"
    targeted: int = 0
    attack: str = "pgd"
    suite: str = "basic"
    pgd_steps: tuple[int, ...] = P.PAPER_PGD_STEPS
    eps_sweep: tuple[float, ...] = P.PAPER_EPS_SWEEP
    sweep_steps: int = 100
    sweep_restarts: int = 1
    min_pert: tuple[str, ...] = ("fgsm-k", "pgd-search")
    min_pert_steps: int = 20
    min_pert_search_steps: int = 10
    autoattack: bool = True
    square_queries: int = 1000
    surrogates: tuple[str, ...] = ()
    sanity: bool = False
    test_subset: int | None = None
    batch_size: int = 256
    precision: str = "fp32"
    fold_bn: bool | None = None  # gradients from the BN-folded view (None: per device)
    seed: int = 0
    save_examples: str | None = None
    num_examples: int = 8
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def protocols(self) -> set[str]:
        if self.suite == "paper":
            p = {"pgd", "min_pert", "eps_sweep", "black_box", "sanity"}
            if self.autoattack:
                p.add("autoattack")
            return p
        if self.suite == "sanity" or self.sanity:
            p = {"pgd", "eps_sweep", "black_box", "sanity"}
            if self.autoattack:
                p.add("autoattack")
            return p
        return {self.attack}


def load_eval_data(
    cfg: dict[str, Any], dataset: str | None, data_dir: str | None, subset: int | None, seed: int
) -> D.ImageTensors:
    name = dataset or cfg.get("dataset")
    if not name:
        raise ConfigError("--dataset: the model file names no dataset; pass --dataset")
    ddir = data_dir if data_dir is not None else cfg.get("data_dir")
    if not D.get_dataset_info(name).in_memory:  # ImageNet-style folders: val/ into memory
        if ddir is None:
            raise ConfigError(f"--data-dir: required for --dataset {name} (val/ inside)")
        return D.load_folder_split(ddir, subset=subset, seed=seed)
    return D.load_split(
        name,
        "test",
        ddir,
        subset=subset,
        seed=seed,
        download=cfg.get("download", True),
        flag="--test-subset",
    )


ROLES = ("g", "f")
_RUN_FILE = re.compile(r"checkpoint\.pt|model_[a-z]+\.safetensors")


def _in_run_folder(path: Path) -> bool:
    """A file of a run folder (its checkpoint or final weights) next to its ``config.json``."""
    return bool(_RUN_FILE.fullmatch(path.name)) and (path.parent / "config.json").is_file()


def eval_config(path: str | Path) -> dict[str, Any]:
    """The training config of a run folder or model file: a weights file's own metadata, else,
    for ``checkpoint.pt`` or ``model_*.safetensors`` inside a run folder, the folder's
    ``config.json`` ({} if none)."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        cfg = run_config(p) if p.is_dir() or p.suffix == ".safetensors" else {}
        if not cfg and p.is_file() and _in_run_folder(p):
            cfg = run_config(p.parent)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = p if p.is_dir() else p.parent
        raise CheckpointError(f"{where / 'config.json'} is not valid JSON ({exc})") from None
    return cfg if isinstance(cfg, dict) else {}


def file_role(path: str | Path) -> str | None:
    """The model a weights file holds: its ``role`` metadata, else its name
    (``model_<role>.safetensors``); None for a folder, a checkpoint or an unnamed file."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return None
    role = read_weights_metadata(p).get("role")
    if role in ROLES:
        return str(role)
    m = re.fullmatch(r"model_([gf])", p.stem)
    return m.group(1) if m else None


def resolve_role(path: str | Path, requested: str | None) -> str:
    """Which model of ``path`` to evaluate: a weights file's own; for a run folder or
    checkpoint ``requested`` (default G). A ``requested`` role the file contradicts is refused."""
    if requested is not None and requested not in ROLES:
        raise ConfigError(
            f"--model: expected g (the robust model) or f (ACT's natural model), got '{requested}'"
        )
    own = file_role(path)
    if own is None:
        return requested or "g"
    if requested is not None and requested != own:
        raise ConfigError(
            f"--model {requested}: {path} holds model {own.upper()}, not {requested.upper()}"
            " (leave out --model: a weights file is evaluated as the model it holds)"
        )
    return own


def run_identity(path: str | Path, requested: str | None) -> tuple[str, str]:
    """(run folder or weights file, model) that ``path`` evaluates: ``run``, ``run/`` and
    ``run/model_g.safetensors`` are one model, which must not count as two seeds."""
    p = Path(path).resolve()
    role = resolve_role(p, requested)
    if p.is_file() and _in_run_folder(p):
        p = p.parent
    return str(p), role


def _check_role(path: str | Path, role: str, cfg: dict[str, Any]) -> None:
    """A Madry/TRADES/natural run has no model F: say so before looking for its file."""
    p = Path(path)
    if role != "f" or not p.is_dir() or (p / "model_f.safetensors").is_file():
        return
    method = cfg.get("method")
    if method and method != "act":
        raise CheckpointError(
            f"{path} has no model F: a {method} run trains only G (--model f is for ACT runs)"
        )


def _dataset_name(name: str) -> str:
    return D.get_dataset_info(name).name


def check_fits(
    model: nn.Module,
    path: str | Path,
    role: str,
    dataset: str,
    *,
    channels: int | None,
    classes: int | None,
    flag: str | None,
) -> None:
    """Refuse a data set whose images or classes the model was not built for (it would end in
    a shape error inside the first attack, or give numbers for the wrong classes)."""
    spec = getattr(model, "spec", None) or {}
    m_channels, m_classes = spec.get("in_channels"), spec.get("num_classes")
    ours, theirs = [], []
    if channels is not None and m_channels is not None:
        ours.append(f"takes {m_channels}-channel images")
        theirs.append(f"{channels}-channel images")
    if classes is not None and m_classes is not None:
        ours.append(f"predicts {m_classes} classes")
        theirs.append(f"{classes} classes")
    if (m_channels, m_classes) != (
        channels if channels is not None else m_channels,
        classes if classes is not None else m_classes,
    ):
        where = f"{flag}: " if flag else ""
        raise ConfigError(
            f"{where}{path} [{role.upper()}] does not fit {dataset}: the model"
            f" {' and '.join(ours)}, {dataset} has {' and '.join(theirs)};"
            " evaluate it on a data set of its shape"
        )


def _try_forward(
    model: nn.Module, test: D.ImageTensors, path: str | Path, role: str, dataset: str
) -> None:
    """One image through the model, so that a model that cannot take the data set's images
    fails here in one line, not inside an attack."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = test.images[:1].float().div(255).to(device)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(
            f"{path} [{role.upper()}] cannot take {dataset} images of shape"
            f" {tuple(test.images.shape[1:])}: {first}"
        ) from None
    if not bool(torch.isfinite(out).all()):  # NaN logits scored as the share of class 0
        raise ConfigError(
            f"{path} [{role.upper()}] gives non-finite outputs (NaN or inf weights: the run"
            " diverged); nothing to evaluate"
        )
    if out.dim() != 2 or out.shape[1] != test.num_classes:
        raise ConfigError(
            f"{path} [{role.upper()}] gives {tuple(out.shape[1:])} outputs, {dataset} has"
            f" {test.num_classes} classes; evaluate it on a data set of its shape"
        )


def _fits_data(
    model: nn.Module,
    path: str | Path,
    role: str,
    dataset: str,
    test: D.ImageTensors,
    flag: str | None,
) -> None:
    """``model`` against the loaded test data: its channels and classes, then one image."""
    channels, classes = int(test.images.shape[1]), test.num_classes
    check_fits(model, path, role, dataset, channels=channels, classes=classes, flag=flag)
    _try_forward(model, test, path, role, dataset)


def check_run(
    path: str,
    *,
    role: str | None,
    dataset: str | None,
    flag: str | None = None,
) -> tuple[str, dict[str, Any], str, nn.Module]:
    """Everything about ``path`` that can be checked before any data is loaded or any attack
    runs: the file, the model (its role), the data set's name and shape. Returns the role, the
    run's config, the evaluation data set's canonical name and the model (on the CPU)."""
    if not Path(path).exists():
        raise CheckpointError(f"no such run folder or weights file: {path}")
    role = resolve_role(path, role)
    inside = ("config.json", "checkpoint.pt", f"model_{role}.safetensors")
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in inside):
        raise CheckpointError(f"{path} is no run folder (none of {', '.join(inside)} in it)")
    cfg = eval_config(path)
    _check_role(path, role, cfg)
    name = dataset or cfg.get("dataset")
    info = D.get_dataset_info(str(name)) if name else None
    model = load_model(path, role=role, device="cpu")  # "not a weights file" comes first
    if info is None:
        raise ConfigError(
            f"--dataset: {path} names no dataset (no training config with it); pass --dataset"
        )
    check_fits(
        model,
        path,
        role,
        info.name,
        channels=info.in_channels,
        classes=info.num_classes,
        flag=flag if flag is not None else ("--dataset" if dataset else None),
    )
    return role, cfg, info.name, model


def _log(progress: bool, msg: str) -> None:
    if progress:
        import sys

        print(msg, file=sys.stderr, flush=True)


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    opts: EvalOptions,
    surrogates: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """All protocols ``opts`` asks for on one model; x in [0, 1] on the CPU."""
    protos = opts.protocols()
    res: dict[str, Any] = {"n": len(y), "eps": opts.eps}
    t0 = time.perf_counter()
    keep_adv: dict[str, Tensor] = {}
    common = {"batch_size": opts.batch_size, "seed": opts.seed, "progress": opts.progress}

    if "pgd" in protos and opts.suite == "basic" and not opts.sanity:
        out = P.robust_accuracy(
            model,
            x,
            y,
            eps=opts.eps,
            step_size=opts.step_size,
            steps=opts.steps,
            restarts=opts.restarts,
            loss=opts.loss,
            targeted=opts.targeted,
            precision=opts.precision,
            fold_bn=opts.fold_bn,
            **common,
        )
        res.update(P.pgd_result(out))
        keep_adv["pgd"] = out["x_adv"]
    elif "pgd" in protos:
        res["pgd"] = {}
        for k in opts.pgd_steps:
            out = P.robust_accuracy(
                model,
                x,
                y,
                eps=opts.eps,
                step_size=opts.step_size,
                steps=k,
                restarts=opts.restarts,
                loss=opts.loss,
                targeted=opts.targeted,
                precision=opts.precision,
                fold_bn=opts.fold_bn,
                **common,
            )
            res["pgd"][str(k)] = P.pgd_result(out)
            res.setdefault("clean_acc", out["clean_acc"])
            keep_adv.setdefault("pgd", out["x_adv"])
            _log(opts.progress, f"  PGD-{k}x{opts.restarts}: {out['robust_acc']:.2f}%")
        first = str(opts.pgd_steps[0])
        res["robust_acc"] = res["pgd"][first]["robust_acc"]
        variant = attack_variant(res["pgd"][first]["attack"])
        res["robust_acc_attack"] = f"PGD-{first}x{opts.restarts}{variant}"
    if "fgsm" in protos:
        res.update(P.clean_accuracy(model, x, y, opts.batch_size))
        res.pop("correct_examples")
        out = P.fgsm_accuracy(model, x, y, eps=opts.eps, batch_size=opts.batch_size)
        res.update(robust_acc=out["robust_acc"], attack=out["attack"])
    if "autoattack" in protos:
        out = P.autoattack_accuracy(
            model,
            x,
            y,
            eps=opts.eps,
            batch_size=opts.batch_size,
            seed=opts.seed,
            progress=opts.progress,
            fold_bn=opts.fold_bn,
        )
        out.pop("_mask")
        if opts.suite == "basic" and not opts.sanity:
            res.update(
                clean_acc=out["clean_acc"], robust_acc=out["robust_acc"], attack=out["attack"]
            )
            res["autoattack"] = out
        else:
            res["autoattack"] = out
            _log(opts.progress, f"  AutoAttack: {out['robust_acc']:.2f}%")
    if "min_pert" in protos:
        out = P.minimum_perturbation(
            model,
            x,
            y,
            methods=opts.min_pert,
            pgd_steps=opts.min_pert_steps,
            search_steps=opts.min_pert_search_steps,
            keep_examples=bool(opts.save_examples),
            known_adv=keep_adv.get("pgd"),
            fold_bn=opts.fold_bn,
            precision=opts.precision,
            **common,
        )
        for m in opts.min_pert:
            if "_x_adv" in out[m]:
                keep_adv[f"min_pert:{m}"] = out[m].pop("_x_adv")
            _log(opts.progress, f"  min perturbation ({m}): {out[m]['mean']:.5f}")
        res["min_perturbation"] = out
    if "eps_sweep" in protos:
        res["eps_sweep"] = P.eps_sweep(
            model,
            x,
            y,
            eps_255=opts.eps_sweep,
            steps=opts.sweep_steps,
            restarts=opts.sweep_restarts,
            step_size=opts.step_size,
            fold_bn=opts.fold_bn,
            precision=opts.precision,
            **common,
        )
        accs = ", ".join(
            f"{r['eps_255']:g}: {r['robust_acc']:.2f}" for r in res["eps_sweep"]["rows"]
        )
        _log(opts.progress, f"  eps sweep: {accs}")
    if "black_box" in protos:
        bb: dict[str, Any] = {}
        if opts.square_queries > 0:
            bb["square"] = P.square_accuracy(
                model,
                x,
                y,
                eps=opts.eps,
                queries=opts.square_queries,
                fold_bn=opts.fold_bn,
                **common,
            )
            _log(
                opts.progress, f"  Square-{opts.square_queries}: {bb['square']['robust_acc']:.2f}%"
            )
        if surrogates:
            bb["transfer"] = {}
            for name, sur in surrogates.items():
                x_adv = P.transfer_examples(
                    sur,
                    x,
                    y,
                    eps=opts.eps,
                    step_size=opts.step_size,
                    steps=20,
                    fold_bn=opts.fold_bn,
                    precision=opts.precision,
                    **common,
                )
                t = P.transfer_success(model, x, x_adv, y, opts.batch_size)
                t["attack"] = _transfer_attack(opts)
                bb["transfer"][name] = t
        res["black_box"] = bb
    if "sanity" in protos:
        res["sanity"] = sanity_checks(res)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["_adv"] = keep_adv
    return res


def _transfer_attack(opts: EvalOptions) -> dict[str, Any]:
    return {
        "name": "PGD-20 transfer",
        "norm": "Linf",
        "eps": opts.eps,
        "step_size": P.pgd_step_size(opts.eps, 20, opts.step_size),
        "steps": 20,
        "restarts": 1,
        "loss": "ce",
        "start": "uniform",
        "examples": "final PGD iterate on the surrogate",
        "seed": opts.seed,
    }


def _settings(opts: EvalOptions) -> dict[str, Any]:
    s = asdict(opts)
    for k in ("progress", "extra", "save_examples", "num_examples"):
        s.pop(k)
    s["protocols"] = sorted(opts.protocols())
    return s


def prepare(
    path: str,
    *,
    dataset: str | None,
    data_dir: str | None,
    test_subset: int | None,
    seed: int,
    role: str | None,
    device: str,
    flag: str | None = None,
) -> tuple[nn.Module, D.ImageTensors, dict[str, Any], str]:
    """The model (the role resolved: see :func:`resolve_role`), its test data and its config;
    a model that does not fit the data is refused here, before any attack."""
    role, cfg, name, model = check_run(path, role=role, dataset=dataset, flag=flag)
    dev = resolve_device(device)
    test = load_eval_data(cfg, dataset, data_dir, test_subset, seed)
    model = model.to(dev)
    flag = flag if flag is not None else ("--dataset" if dataset else None)
    _fits_data(model, path, role, name, test, flag)
    if name == "imagefolder":  # the folder names are the labels: a renamed class moves them
        check_same_class_names(recorded_classes(path, role), list(test.classes), path, role)
    return model, test, cfg, role


def recorded_classes(path: str | Path, role: str) -> list[str] | None:
    """The class names a model was trained on, from its weights file (None where unknown)."""
    p = Path(path)
    f = p / f"model_{role}.safetensors" if p.is_dir() else p
    if f.suffix != ".safetensors" or not f.is_file():
        return None
    classes = read_weights_metadata(f).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def check_same_class_names(
    trained: list[str] | None, found: list[str], path: str | Path, role: str
) -> None:
    if trained is None or trained == found:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(trained, found, strict=False)) if a != b),
        min(len(trained), len(found)),
    )
    raise ConfigError(
        f"{path} [{role.upper()}] was trained on {len(trained)} classes and the data has"
        f" {len(found)} whose sorted names differ from position {first} on"
        f" ({trained[first : first + 3]} vs {found[first : first + 3]}): its labels would not"
        " match; evaluate it on the folder it was trained on"
    )


def evaluate_loaded(
    path: str,
    model: nn.Module,
    test: D.ImageTensors,
    cfg: dict[str, Any],
    opts: EvalOptions,
    *,
    role: str = "g",
    dataset: str | None = None,
    surrogates: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    x = test.images.float().div(255)
    res = evaluate_model(model, x, test.labels, opts, surrogates)
    adv = res.pop("_adv")
    out = {
        "run": str(path),
        "label": _run_label(path, cfg, role),
        "model": role,
        "method": cfg.get("method"),
        "dataset": dataset or cfg.get("dataset"),
        **res,
        "settings": _settings(opts),
        "indices": test.indices.tolist(),
    }
    if opts.save_examples:
        out["examples_png"] = _save_examples(model, x, test, adv, opts, out["label"])
    return out


def _run_label(path: str, cfg: dict[str, Any], role: str) -> str:
    p = Path(path)
    if p.is_dir():
        name = p.name
    elif _RUN_FILE.fullmatch(p.name) and p.resolve().parent.name:
        name = p.resolve().parent.name  # run1/model_f.safetensors: the run, not "model_f"
    else:
        name = p.stem
    method = cfg.get("method")
    base = f"{method} ({name})" if method and method not in name else name
    return base + (" [F]" if role == "f" else "")


def _save_examples(
    model: nn.Module,
    x: Tensor,
    test: D.ImageTensors,
    adv: dict[str, Tensor],
    opts: EvalOptions,
    label: str,
) -> str:
    from actrain.evaluation.figures import pick, save_examples

    key = next((k for k in ("min_pert:pgd-search", "min_pert:fgsm-k") if k in adv), None)
    if key is None:
        # Not computed by the chosen protocols: find minimal examples on a few images now.
        k = min(len(x), 4 * opts.num_examples)
        mp = P.minimum_perturbation(
            model,
            x[:k],
            test.labels[:k],
            methods=("fgsm-k", "pgd-search"),
            pgd_steps=opts.min_pert_steps,
            search_steps=opts.min_pert_search_steps,
            batch_size=opts.batch_size,
            seed=opts.seed,
            keep_examples=True,
        )
        x_adv_all = mp["pgd-search"]["_x_adv"]
        found = torch.tensor([d is not None and d > 0 for d in mp["pgd-search"]["per_example"]])
        xs = x[:k]
        key = "min_pert:pgd-search"
    else:
        x_adv_all = adv[key]
        xs = x
        found = (x_adv_all - xs).flatten(1).abs().amax(1) > 0
    sel = pick(found, opts.num_examples)
    clean_pred = P.predict(model, xs[sel])
    adv_pred = P.predict(model, x_adv_all[sel])
    try:
        path = save_examples(
            opts.save_examples,
            xs[sel],
            x_adv_all[sel],
            clean_pred,
            adv_pred,
            test.classes,
            title=f"{label}: minimal adversarial examples ({key.split(':')[1]})",
        )
    except OSError as exc:
        raise UsageError(
            f"--save-examples: cannot write {opts.save_examples} ({exc.strerror or exc})"
        ) from None
    return str(path)


def evaluate_run(
    path: str,
    *,
    attack: str = "pgd",
    steps: int = 20,
    restarts: int = 5,
    eps: float | None = None,
    step_size: float | None = None,
    loss: str = "ce",
    test_subset: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    role: str | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate one run folder or weights file; returns the JSON-ready result.

    With the defaults this is the base command (clean and PGD-20x5 accuracy at the run's
    training eps, 8/255 where it has none); ``suite="paper"`` adds every protocol of the paper
    (see :class:`EvalOptions` for the other options).
    """
    if attack not in ATTACKS:
        raise ConfigError(f"--attack: unknown attack '{attack}' (choices: {', '.join(ATTACKS)})")
    if eps is None:  # as `actrain eval` (it took 8/255 where the CLI took the run's eps)
        trained = eval_config(path).get("eps") if Path(path).exists() else None
        eps = 8 / 255 if trained is None else parse_fraction(trained, "eps")
    surrogate_paths = tuple(options.pop("surrogates", ()) or ())
    opts = EvalOptions(
        eps=eps,
        step_size=step_size,
        steps=steps,
        restarts=restarts,
        loss=loss,
        attack=attack,
        test_subset=test_subset,
        batch_size=batch_size,
        precision=precision,
        seed=seed,
        progress=progress,
        surrogates=surrogate_paths,
        **options,
    )
    if opts.suite not in SUITES:
        raise ConfigError(f"--suite: unknown suite '{opts.suite}' (choices: {', '.join(SUITES)})")
    check_options(opts)
    model, test, cfg, role = prepare(
        path,
        dataset=dataset,
        data_dir=data_dir,
        test_subset=test_subset,
        seed=seed,
        role=role,
        device=device,
    )
    name = _dataset_name(dataset or cfg["dataset"])
    if opts.targeted > test.num_classes - 1:
        raise ConfigError(
            f"--targeted: at most {test.num_classes - 1} (the wrong classes of {name}),"
            f" got {opts.targeted}"
        )
    surrogates = {}
    for sp in surrogate_paths:
        sm, slabel, srole = check_surrogate(sp, target=path, target_dataset=name, dataset=dataset)
        sm = sm.to(resolve_device(device))
        _fits_data(sm, sp, srole, name, test, "--surrogate")
        surrogates[slabel] = sm
    out = evaluate_loaded(
        path, model, test, cfg, opts, role=role, dataset=dataset, surrogates=surrogates
    )
    if not D.get_dataset_info(name).in_memory:  # a folder is its data set: two are two
        out["data_dir"] = str(data_dir if data_dir is not None else cfg.get("data_dir"))
    return out


def check_surrogate(
    path: str, *, target: str, target_dataset: str, dataset: str | None
) -> tuple[nn.Module, str, str]:
    """A ``--surrogate`` run: refused when it was trained on another data set than the one
    ``target`` is evaluated on (as ``--transfer`` refuses it), unless ``--dataset`` puts both
    on one data set. Returns the model (on the CPU), its label and its role."""
    own = dataset or eval_config(path).get("dataset") or target_dataset
    role, cfg, sname, model = check_run(path, role=None, dataset=own, flag="--surrogate")
    if sname != target_dataset:
        raise ConfigError(
            f"--surrogate: {path} was trained on {sname}, {target} is evaluated on"
            f" {target_dataset} (datasets differ); pass --dataset to evaluate both on one data set"
        )
    return model, _run_label(path, cfg, role), role


EVAL_PRECISIONS = ("fp32", "bf16", "fp16")


def check_options(opts: EvalOptions) -> None:
    """The numbers an evaluation would otherwise trip over deep inside a protocol, named by
    their flags before any data is loaded."""
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {opts.batch_size}")
    if opts.steps < 0 or opts.restarts < 1:  # recorded as "PGD--1" / "restarts: 0" before
        raise ConfigError(
            f"--steps must be >= 0 and --restarts >= 1, got {opts.steps} and {opts.restarts}"
        )
    if opts.precision not in EVAL_PRECISIONS:
        raise ConfigError(
            f"--precision: must be one of {', '.join(EVAL_PRECISIONS)}, got {opts.precision}"
        )
    for flag, value, least in (
        ("--sweep-steps", opts.sweep_steps, 1),
        ("--min-pert-search-steps", opts.min_pert_search_steps, 1),
        ("--square-queries", opts.square_queries, 0),
        ("--num-examples", opts.num_examples, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    bad = [e for e in opts.eps_sweep if not 0 <= float(e) <= 255]
    if bad:
        raise ConfigError(f"--eps-sweep: values are in units of 1/255, so 0 to 255; got {bad}")


def transfer_matrix(
    surrogates: list[str] | str,
    targets: list[str] | str,
    *,
    eps: float,
    step_size: float | None = None,
    steps: int = 20,
    test_subset: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    role: str | None = None,
    seed: int = 0,
    progress: bool = True,
    fold_bn: bool | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Table 3: success rate of PGD-k examples made on each surrogate against each target.

    All models are evaluated on the same test examples (same data set, subset and seed); one
    path alone may stand for a list of one.
    """
    surrogates = [str(surrogates)] if isinstance(surrogates, (str, Path)) else list(surrogates)
    targets = [str(targets)] if isinstance(targets, (str, Path)) else list(targets)
    step_size = P.pgd_step_size(eps, steps, step_size)
    check_options(EvalOptions(batch_size=batch_size, precision=precision))
    paths = list(dict.fromkeys(surrogates + targets))
    names = {p: check_run(p, role=role, dataset=dataset)[2] for p in paths}
    for p in paths[1:]:
        if names[p] != names[paths[0]]:  # before loading either data set
            raise ConfigError(
                f"--transfer: {p} is evaluated on {names[p]}, {paths[0]} on {names[paths[0]]}"
                " (datasets differ); pass --dataset"
            )
    loaded: dict[str, tuple[nn.Module, D.ImageTensors, dict[str, Any], str]] = {}
    for p in paths:
        loaded[p] = prepare(
            p,
            dataset=dataset,
            data_dir=data_dir,
            test_subset=test_subset,
            seed=seed,
            role=role,
            device=device,
        )
    ref = loaded[paths[0]][1]
    for p in paths[1:]:
        t = loaded[p][1]
        if not torch.equal(t.indices, ref.indices) or t.num_classes != ref.num_classes:
            raise ConfigError(
                f"--transfer: {p} is evaluated on a different test set than {paths[0]} "
                "(datasets differ); pass --dataset"
            )
    x = ref.images.float().div(255)
    y = ref.labels
    labels = {p: _run_label(p, loaded[p][2], loaded[p][3]) for p in paths}
    rates: dict[str, dict[str, Any]] = {t: {} for t in targets}
    details: dict[str, dict[str, Any]] = {t: {} for t in targets}
    for s in surrogates:
        x_adv = P.transfer_examples(
            loaded[s][0],
            x,
            y,
            eps=eps,
            step_size=step_size,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            fold_bn=fold_bn,
            precision=precision,
        )
        for t in targets:
            r = P.transfer_success(loaded[t][0], x, x_adv, y, batch_size)
            rates[t][s] = r["success_rate"]
            details[t][s] = r
    return {
        "surrogates": surrogates,
        "targets": targets,
        "labels": labels,
        "success_rate": rates,
        "details": details,
        "n": len(y),
        "indices": ref.indices.tolist(),
        "attack": {
            "name": f"PGD-{steps}",
            "norm": "Linf",
            "eps": eps,
            "step_size": step_size,
            "steps": steps,
            "restarts": 1,
            "loss": "ce",
            "start": "uniform",
            "examples": "final PGD iterate on the surrogate",
            "gradients": {
                s: P.gradients_label(loaded[s][0], fold_bn, precision) for s in surrogates
            },
            "seed": seed,
        },
    }


def _clean_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def write_json(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean_json(result), indent=2))
