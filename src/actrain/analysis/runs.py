"""Reading run folders: config, per-epoch metrics, evaluation results, analyses, commands."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actrain.commands import UsageError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
ANALYSIS = Path("analysis") / "analysis.json"
SWEEP = "sweep.json"

#: Config keys that do not change what is trained (seeds are the repeats of a configuration).
NON_SEMANTIC = (
    "seed",
    "out",
    "progress",
    "device",
    "data_dir",
    "download",
    "num_workers",
    "channels_last",
    "fold_bn",
    "fused_bn",
    "cuda_graphs",
    "model_streams",
    "precision",
)


def semantic_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A training config without the settings that change nothing trained; an ImageNet-style
    run keeps its data folder, which is its data set (two folders are two data sets)."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC}
    if config.get("dataset") == "imagefolder":
        semantic["data_dir"] = config.get("data_dir")
    return semantic


@dataclass
class Run:
    """One run folder as the analyses and the report see it."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    # eval/ files left out: another method's or data set's results (file, why)
    foreign_evals: list[tuple[str, str]] = field(default_factory=list)
    analysis: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = None  # the sweep.json that launched this run, if any

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset", "?"))

    @property
    def arch(self) -> str:
        return str(self.config.get("arch", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def roles(self) -> list[str]:
        """The models of the run: ``["g", "f"]`` for ACT, ``["g"]`` otherwise."""
        if (self.path / "model_f.safetensors").is_file() or self.method == "act":
            return ["g", "f"]
        return ["g"]

    @property
    def finished(self) -> bool:
        return bool(self.final and self.final.get("status") == "finished")

    @property
    def epochs_done(self) -> int:
        """Epochs the run has completed (its last metrics record)."""
        return max((int(m.get("epoch", 0)) for m in self.metrics), default=0)

    @property
    def analysis_stale(self) -> bool:
        """The run trained on after its analysis (resumed): the numbers are of older weights.
        Analyses from before the epoch was recorded cannot tell, and count as current."""
        epoch = (self.analysis or {}).get("epoch")
        return epoch is not None and epoch != self.epochs_done

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def processes(self) -> int:
        """torchrun processes the run trained with (its metrics record them; 1 without)."""
        return max((int(m.get("processes", 1)) for m in self.metrics), default=1)

    def semantic_config(self) -> dict[str, Any]:
        """What makes a configuration: the config without seed, paths, device ..., and the
        process count (``--batch-size`` is per process: 2 processes train a twice larger
        global batch)."""
        semantic = semantic_settings(self.config)
        if self.processes > 1:
            semantic["processes"] = self.processes
        return semantic

    def last_eval_record(self) -> dict[str, Any] | None:
        """The last metrics record that holds a during-training evaluation, up to the epoch of
        the weights the run kept (the overfitting guard keeps an earlier epoch's; the record
        of the collapsed epoch after it was reported)."""
        kept = (self.final or {}).get("final_weights_epoch")
        for rec in reversed(self.metrics):
            if kept is not None and rec.get("epoch", 0) > kept:
                continue
            if any(k.endswith(("_acc_g", "_acc_f")) and not k.startswith("train") for k in rec):
                return rec
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (run still writing) is skipped."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_run(path: str | Path) -> Run:
    p = Path(path)
    if not (p / CONFIG).is_file():
        raise UsageError(f"not a run folder (no {CONFIG}): {p}")
    config = _read_json(p / CONFIG)
    if not isinstance(config, dict):
        raise UsageError(f"unreadable {CONFIG} in {p}")
    final = _read_json(p / "final.json") if (p / "final.json").is_file() else None
    evals: list[dict[str, Any]] = []
    foreign: list[tuple[str, str]] = []
    if (p / "eval").is_dir():
        for f in sorted((p / "eval").rglob("*.json")):
            obj = _read_json(f)
            if not isinstance(obj, dict):  # an empty or cut file: its numbers are missing
                foreign.append((str(f), "unreadable: not a JSON object"))
                continue
            why = _not_this_runs(obj, config)
            if why:
                foreign.append((str(f), f"{why}, not of {p}"))
            else:
                evals.append({**obj, "_file": str(f)})
    analysis = _read_json(p / ANALYSIS) if (p / ANALYSIS).is_file() else None
    return Run(
        path=p,
        config=config,
        metrics=read_jsonl(p / METRICS),
        final=final if isinstance(final, dict) else None,
        evals=evals,
        foreign_evals=foreign,
        analysis=analysis if isinstance(analysis, dict) else None,
    )


def _not_this_runs(result: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Why an ``actrain eval`` result in a run's eval/ folder is of another run (its method or
    data set differs from the run's), or None. A file placed there by mistake was credited to
    the run: another method's numbers under this run's name."""
    for key in ("method", "dataset"):
        theirs, ours = result.get(key), config.get(key)
        if isinstance(theirs, str) and ours is not None and theirs != ours:
            if key == "method":
                return f"an evaluation of a {theirs} run"
            return f"evaluated on {theirs}"
    return None


def expand_run_args(paths: list[str]) -> list[Run]:
    """Run folders from the command line: a run folder, a sweep folder (its ``sweep.json``), or
    a folder whose sub-folders are runs. Order is kept; duplicates are dropped."""
    runs: list[Run] = []
    seen: set[Path] = set()

    def add(p: Path, sweep: dict[str, Any] | None = None) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        run = load_run(p)
        run.sweep = sweep
        runs.append(run)

    for arg in paths:
        p = Path(arg)
        if not p.exists():
            raise UsageError(f"no such run folder: {p}")
        if (p / CONFIG).is_file():
            add(p)
        elif (p / SWEEP).is_file():
            sweep = _read_json(p / SWEEP)
            if not isinstance(sweep, dict):
                raise UsageError(f"unreadable {p / SWEEP}")
            for entry in sweep.get("runs", []):
                rp = p / Path(entry["out"]).name  # the sweep folder's own child, even if moved
                if not (rp / CONFIG).is_file():
                    rp = Path(entry["out"])
                if (rp / CONFIG).is_file():
                    add(rp, sweep)
        elif p.is_dir():
            subs = sorted(c for c in p.iterdir() if (c / CONFIG).is_file())
            if not subs:
                raise UsageError(f"{p} holds no run folders (no {CONFIG} in it or its sub-folders)")
            for c in subs:
                add(c)
        else:
            raise UsageError(f"not a run folder: {p}")
    return runs


# ---- commands ---------------------------------------------------------------------------------
def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def train_command(config: dict[str, Any]) -> str:
    """The ``actrain train`` command line that reproduces a run from its resolved config."""
    from actrain.config import ON_OFF_FLAGS, TrainConfig

    defaults = TrainConfig().to_dict()
    args = ["actrain", "train"]
    for key, value in config.items():
        if key in ("progress", "out") or key not in defaults:
            continue
        if value == defaults[key] and key not in ("method", "dataset", "arch", "seed"):
            continue
        if value is None:
            continue
        if key in ON_OFF_FLAGS:
            if flag := ON_OFF_FLAGS[key][0 if value else 1]:
                args.append(flag)
            continue
        if isinstance(value, list):
            args += [_flag(key), *(str(v) for v in value)]
        else:
            args += [_flag(key), str(value)]
    if config.get("out"):
        args += ["--out", str(config["out"])]
    return shlex.join(args)


def eval_command(run: Run, record: dict[str, Any]) -> str:
    """The command of an evaluation result: its own ``command`` field, else rebuilt from it."""
    if isinstance(record.get("command"), str):
        return record["command"]
    if isinstance(record.get("argv"), list):
        return shlex.join(str(a) for a in record["argv"])
    att = record.get("attack") if isinstance(record.get("attack"), dict) else {}
    args = ["actrain", "eval", str(record.get("run", run.path))]
    if record.get("model", "g") != "g":
        args += ["--model", str(record["model"])]
    for key in ("steps", "restarts", "eps", "step_size", "loss", "precision", "seed"):
        value = att.get(key)
        if value is None or (key, value) in (("loss", "ce"), ("precision", "fp32"), ("seed", 0)):
            continue
        args += [_flag(key), f"{value:.6g}" if isinstance(value, float) else str(value)]
    indices = record.get("indices")
    if record.get("test_subset"):
        args += ["--test-subset", str(record["test_subset"])]
    elif isinstance(indices, list) and indices != list(range(len(indices))):
        args += ["--test-subset", str(len(indices))]  # a seeded balanced subset, not all
    if record.get("_file"):
        args += ["--json", record["_file"]]
    return shlex.join(args)
