"""``actrain sweep``: one training run per value of a parameter (Table 1's alpha sweep, seeds ...).

Each run is ``python -m actrain train --config FILE --<param> VALUE --out DIR/<param>-<value>``
in its own process (``--jobs N`` at a time), with its output in ``DIR/<param>-<value>.log``.
``DIR/sweep.json`` lists the runs and is rewritten as they finish; a sweep that is started
again skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from actrain.checkpoint import atomic_write_text
from actrain.commands import UsageError
from actrain.config import FIELDS, ON_OFF_FLAGS, build_config, load_yaml
from actrain.errors import EXIT_INTERRUPTED, TrainingStopped

NOT_SWEEPABLE = ("out", "progress")
STOP_GRACE_S = 300.0  # a stopped run's last step and checkpoint (ImageNet-size steps take long)


def param_key(param: str, flag: str = "--param") -> str:
    key = param.strip().lstrip("-").replace("-", "_")
    if key not in FIELDS or key in NOT_SWEEPABLE:
        import difflib

        close = difflib.get_close_matches(key, [k for k in FIELDS if k not in NOT_SWEEPABLE], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"{flag}: '{param}' is not a training option{hint}")
    return key


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``--set key=value`` overrides for every run of the sweep."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set: expected KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[param_key(k, "--set")] = v.strip()
    return out


def _flags(key: str, value: str) -> list[str]:
    if key in ON_OFF_FLAGS:
        flag = ON_OFF_FLAGS[key][0 if str(value).lower() in ("1", "true", "yes") else 1]
        return [flag] if flag else []  # no flag: the default
    if key == "milestones":
        return ["--milestones", *str(value).replace(",", " ").split()]
    return ["--" + key.replace("_", "-"), str(value)]


def _folder_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value)


def plan_sweep(
    param: str,
    values: list[str],
    *,
    config: str | None,
    out_dir: str | Path,
    sets: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One entry per value (``value``, ``out``, ``argv``); every config is validated first."""
    key = param_key(param)
    if not values:
        raise UsageError("--param: give the parameter name and at least one value")
    if len(set(values)) != len(values):
        raise UsageError(f"--param {param}: repeated values in {' '.join(values)}")
    sets = dict(sets or {})
    if key in sets:
        raise UsageError(f"--set {key}=... conflicts with --param {param}")
    file_values = load_yaml(config) if config else {}
    out_dir = Path(out_dir)
    plan = []
    seen: dict[str, str] = {}  # the value as the run takes it -> as given
    for v in values:
        overrides: dict[str, Any] = {**sets, key: v}
        if key == "milestones":
            overrides[key] = v.replace(",", " ")
        run_dir = out_dir / f"{key}-{_folder_value(v)}"
        overrides["out"] = str(run_dir)
        cfg = build_config(file_values, overrides)  # raises ConfigError naming the bad value
        taken = json.dumps(getattr(cfg, key), sort_keys=True)
        if taken in seen:  # 0.1 and 0.10: two folders, one configuration, the same seed
            raise UsageError(f"--param {param}: {seen[taken]} and {v} are the same value")
        seen[taken] = v
        _check_earlier_config(run_dir, cfg.to_dict())
        argv = [sys.executable, "-m", "actrain", "train"]
        if config:
            argv += ["--config", str(config)]
        for k, sv in sets.items():
            argv += _flags(k, sv)
        argv += _flags(key, v)
        argv += ["--out", str(run_dir), "--no-progress"]
        plan.append({"value": v, "out": str(run_dir), "argv": argv})
    return plan


def _check_earlier_config(run_dir: Path, planned: dict[str, Any]) -> None:
    """A run folder this sweep made before, trained with other settings (the config file was
    edited since): skipping or resuming it would put two configurations in one table."""
    from actrain.analysis.runs import NON_SEMANTIC

    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return
    differ = sorted(
        k
        for k, v in planned.items()
        if k not in NON_SEMANTIC and k not in ("out", "progress") and k in saved
        and saved[k] != v
    )  # fmt: skip
    if differ:
        each = ", ".join(f"{k} {saved[k]!r} (now {planned[k]!r})" for k in differ)
        raise UsageError(
            f"--out: {run_dir} was trained with {each}; the config changed since that run:"
            " choose another --out, or move that run away"
        )


def _state(run_dir: Path) -> str:
    final = run_dir / "final.json"
    if final.is_file():
        try:
            if json.loads(final.read_text()).get("status") == "finished":
                return "finished"
        except (OSError, json.JSONDecodeError):
            pass
    if (run_dir / "checkpoint.pt").is_file():
        return "partial"
    return "new"


def _earlier_runs(
    sweep_json: Path,
    param: str,
    config: str | None,
    sets: dict[str, str],
    plan: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The runs an earlier sweep into the same folder made with values this one does not
    plan, so that sweeping more values into it adds to the sweep (each entry keeps the
    command that made it). A folder holding a sweep of another parameter, config or set of
    options is refused: its runs and these would not form one table."""
    if not sweep_json.is_file():
        return []
    try:
        old = json.loads(sweep_json.read_text())
    except (OSError, ValueError):
        raise UsageError(f"--out: {sweep_json} is unreadable; choose another --out") from None
    theirs = (old.get("param"), old.get("config"), old.get("sets") or {})
    if theirs != (param, config, sets):
        raise UsageError(
            f"--out: {sweep_json.parent} holds a sweep of {theirs[0]} with other settings"
            f" (config {theirs[1]}, --set {theirs[2]}); choose another --out"
        )
    planned = {str(Path(p["out"]).name) for p in plan}
    kept = [dict(e) for e in old.get("runs", []) if Path(e["out"]).name not in planned]
    for e in kept:
        e.setdefault("command", old.get("command"))
    return kept


def run_sweep(
    plan: list[dict[str, Any]],
    *,
    out_dir: str | Path,
    param: str,
    config: str | None,
    sets: dict[str, str],
    jobs: int = 1,
    command: str | None = None,
    echo=print,
) -> dict[str, Any]:
    """Launch the planned runs, ``jobs`` processes at a time; write and return ``sweep.json``."""
    if jobs < 1:
        raise UsageError(f"--jobs: must be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    sweep_json = out_dir / "sweep.json"
    earlier = _earlier_runs(sweep_json, param_key(param), config, sets, plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [
        {"value": p["value"], "out": p["out"], "status": "pending", "log": None, "command": command}
        for p in plan
    ]
    doc: dict[str, Any] = {
        "param": param_key(param),
        "values": [e["value"] for e in earlier] + [p["value"] for p in plan],
        "config": config,
        "sets": sets,
        "jobs": jobs,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": earlier + runs,
    }
    first = len(earlier)  # doc["runs"][first + i] is plan[i]

    def save() -> None:
        atomic_write_text(sweep_json, json.dumps(doc, indent=2))

    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    queue = list(range(len(plan)))
    running: dict[int, tuple[subprocess.Popen, Any, float]] = {}
    save()
    stop: list[str] = []  # the signal that asked this sweep to stop

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signal.Signals(signum).name)

    previous = {
        sig: signal.signal(sig, on_signal)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread()
    }
    try:
        _launch_and_wait(plan, doc, first, queue, running, stop, jobs, out_dir, env, save, echo)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        raise TrainingStopped(
            f"stopped by {stop[0]}; each run stopped at a checkpoint: the same command goes on",
            EXIT_INTERRUPTED,
        )
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
    return doc


def _stop_runs(
    running: dict[int, tuple[subprocess.Popen, Any, float]],
    doc: dict[str, Any],
    first: int,
    save: Any,
    echo: Any,
    grace_s: float = STOP_GRACE_S,
) -> None:
    """Pass the stop on (SIGINT: each run finishes its step and writes a checkpoint), wait for
    the runs, and record them as interrupted; a run still going after ``grace_s`` is killed.
    A sweep that left its runs training (it did) had them race a re-run in the same folders."""
    for proc, _, _ in running.values():
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for i, (proc, log, _) in running.items():
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        doc["runs"][first + i].update(status="interrupted", returncode=rc)
        echo(f"    {doc['param']}={doc['runs'][first + i]['value']}: interrupted (exit {rc})")
    running.clear()
    save()


def _launch_and_wait(
    plan: list[dict[str, Any]],
    doc: dict[str, Any],
    first: int,
    queue: list[int],
    running: dict[int, tuple[subprocess.Popen, Any, float]],
    stop: list[str],
    jobs: int,
    out_dir: Path,
    env: dict[str, str],
    save: Any,
    echo: Any,
) -> None:
    """Start the planned runs, ``jobs`` at a time, until all ended or ``stop`` holds a signal."""
    while queue or running:
        if stop:
            echo(f"sweep: {stop[0]} received; stopping the runs at their next checkpoint")
            _stop_runs(running, doc, first, save, echo)
            return
        while queue and len(running) < jobs:
            i = queue.pop(0)
            entry, p = doc["runs"][first + i], plan[i]
            state = _state(Path(p["out"]))
            if state == "finished":
                entry.update(status="finished", returncode=0, note="already finished; skipped")
                echo(f"[{i + 1}/{len(plan)}] {doc['param']}={p['value']}: already finished")
                continue
            argv = list(p["argv"]) + (["--resume"] if state == "partial" else [])
            log_path = out_dir / f"{Path(p['out']).name}.log"
            log = open(log_path, "a")  # noqa: SIM115 - closed when the process ends
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            # its own session: a Ctrl-C at the terminal reaches the sweep alone, which passes
            # one SIGINT on (two would stop a run at once, without its checkpoint)
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            running[i] = (proc, log, time.perf_counter())
            entry.update(status="running", log=str(log_path), argv=argv)
            verb = "resuming" if state == "partial" else "started"
            echo(f"[{i + 1}/{len(plan)}] {doc['param']}={p['value']}: {verb} -> {p['out']}")
            save()
        time.sleep(0.2)
        for i, (proc, log, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            del running[i]
            entry = doc["runs"][first + i]
            entry.update(
                status="finished" if rc == 0 else "failed",
                returncode=rc,
                seconds=round(time.perf_counter() - t0, 2),
            )
            msg = f"finished in {entry['seconds']:.1f}s" if rc == 0 else f"FAILED (exit {rc})"
            echo(f"[{i + 1}/{len(plan)}] {doc['param']}={plan[i]['value']}: {msg}")
            if rc != 0:
                tail = Path(entry["log"]).read_text().strip().splitlines()[-3:]
                for line in tail:
                    echo(f"    {line}")
            save()
