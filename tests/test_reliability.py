"""Faults, bad input and unsafe files: each behaviour of issue 4, on small real data."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actrain import cli
from actrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from actrain.config import build_config
from actrain.errors import TrainingStopped
from actrain.train import run_training

FAST = [
    "--dataset", "digits", "--arch", "small_cnn", "--width", "8", "--batch-size", "64",
    "--eps", "0.1", "--step-size", "0.025", "--steps", "3", "--precision", "fp32",
    "--eval-every", "0", "--no-progress", "--device", "cpu", "--lr", "0.05",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _actrain(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "actrain", *args], capture_output=True, text=True, env=ENV, **kw
    )


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "actrain", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for role in ("g", "f"):
        for k, v in load_file(str(run / f"model_{role}.safetensors")).items():
            out[f"{role}.{k}"] = v
    return out


# ---- faults -----------------------------------------------------------------------------------
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    args = [*FAST, "--method", "act", "--epochs", "4", "--checkpoint-every", "5", "--deterministic"]
    ref = _actrain("train", *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    proc = _start("train", *args, "--out", str(run))
    _wait_for(run / "checkpoint.pt", proc)
    time.sleep(random.uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final.json").exists(), "the run finished before it could be killed"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"]) != (4, 0)

    res = _actrain("train", "--resume", str(run), "--no-progress")
    assert res.returncode == 0, res.stderr
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


def test_sigterm_writes_checkpoint_and_exits_75(tmp_path):
    run = tmp_path / "run"
    proc = _start("train", *FAST, "--method", "madry", "--epochs", "6", "--checkpoint-every",
                  "3", "--out", str(run))  # fmt: skip
    _wait_for(run / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] * 23 + ckpt["batch"] == ckpt["global_step"]  # 23 batches per epoch
    assert not (run / "final.json").exists()
    res = _actrain("train", "--resume", str(run))
    assert res.returncode == 0, res.stderr
    assert (run / "model_g.safetensors").is_file()


def test_atomic_checkpoint_keeps_previous_on_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_disk_full_on_save_stops_with_message(tmp_path, monkeypatch):
    import actrain.train as T

    cfg = build_config({}, _cfg_values(tmp_path, epochs=3))
    calls = {"n": 0}
    real = T.save_checkpoint

    def flaky(path, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(path, state)

    monkeypatch.setattr(T, "save_checkpoint", flaky)
    with pytest.raises(TrainingStopped, match="No space left on device.*previous checkpoint"):
        run_training(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def _cfg_values(tmp_path: Path, **kw) -> dict:
    return {
        "method": "natural", "dataset": "digits", "arch": "small_cnn", "width": 8,
        "batch_size": 64, "precision": "fp32", "eval_every": 0, "progress": False,
        "device": "cpu", "out": str(tmp_path / "run"), **kw,
    }  # fmt: skip


def test_nan_loss_stops_naming_step_and_model(tmp_path):
    cfg = build_config({}, _cfg_values(tmp_path, epochs=2, lr=1e12, momentum=0.0))
    with pytest.raises(TrainingStopped, match=r"non-finite loss at epoch 1, step \d+, model G"):
        run_training(cfg)


def test_nan_policy_skip_counts_bad_batches(tmp_path, monkeypatch):
    # every third batch's loss is NaN (weights stay finite: a diverged run stops, see below)
    from actrain import losses

    calls = {"n": 0}
    natural_loss = losses.natural_loss

    def sometimes_nan(logits, target):
        calls["n"] += 1
        loss = natural_loss(logits, target)
        return loss * float("nan") if calls["n"] % 3 == 0 else loss

    monkeypatch.setattr(losses, "natural_loss", sometimes_nan)
    cfg = build_config({}, _cfg_values(tmp_path, epochs=1, nan_policy="skip"))
    run = run_training(cfg)
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_batches"] == calls["n"] // 3 > 0
    assert json.loads((run / "final.json").read_text())["status"] == "finished"


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *FAST, "--method", "natural", "--epochs", "1", "--out", str(out)]
    assert cli.main(args) == 0
    before = (out / "model_g.safetensors").read_bytes()
    assert cli.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model_g.safetensors").read_bytes() == before
    assert cli.main([*args, "--overwrite", "--seed", "3"]) == 0
    assert (out / "model_g.safetensors").read_bytes() != before


# ---- unsafe and broken files ------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forged_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_checkpoint_gives_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--method", "natural", "--epochs", "1",
                     "--out", str(out)]) == 0  # fmt: skip
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    (out / "model_g.safetensors").write_bytes(b"garbage")
    assert cli.main(["eval", str(out), "--no-progress"]) == 2
    assert "cannot read weights" in capsys.readouterr().err


def test_weights_from_another_architecture_name_the_mismatch(tmp_path, capsys):
    from actrain.checkpoint import save_weights
    from actrain.models import create_model

    small = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    big = create_model("small_cnn", num_classes=10, in_channels=1, width=16)
    small.spec = big.spec  # header says width 16, tensors are width 8
    save_weights(tmp_path / "w.safetensors", small, {"config": {"dataset": "digits"}})
    assert cli.main(["eval", str(tmp_path / "w.safetensors"), "--no-progress"]) == 2
    assert "does not match the architecture: shape of" in capsys.readouterr().err


def test_resume_with_different_config_lists_differences(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--method", "natural", "--epochs", "1",
                     "--out", str(out)]) == 0  # fmt: skip
    assert cli.main(["train", "--resume", str(out), "--lr", "0.3", "--eps", "8/255"]) == 2
    err = capsys.readouterr().err
    assert "lr: saved 0.05 vs given 0.3" in err and "eps: saved" in err
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0  # allowed change


def test_resume_refuses_another_batch_size_on_the_same_number_of_processes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *FAST, "--method", "natural", "--epochs", "1", "--out", str(out)]
    assert cli.main(args) == 0
    config = (out / "config.json").read_text()
    assert cli.main(["train", "--resume", str(out), "--epochs", "2", "--batch-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 16 would change the run's batch (64 per process x 1)" in err
    assert (out / "config.json").read_text() == config  # nothing rewritten
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "extra", [["--train-subset", "1"], ["--train-subset", "11", "--val-size", "10"]]
)
def test_a_single_training_image_is_refused_not_trained_as_zeros(tmp_path, capsys, extra):
    out = tmp_path / "run"
    rc = cli.main(["train", *FAST, "--method", "act", "--epochs", "1", *extra, "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: training data: 1 image, a batch of one, which batch norm"
                            " cannot train on; use at least 2 training images (--train-subset,"
                            " --val-size)")  # fmt: skip
    assert not (out / "final.json").exists() and not (out / "checkpoint.pt").exists()


# ---- bad input: one line, exit 2, no traceback, before any data is loaded ---------------------
ROOT = Path(__file__).resolve().parents[1]
BAD = [
    (["--method", "actt"], "did you mean 'act'"),
    (["--arch", "resnt18"], "did you mean 'resnet18'"),
    (["--dataset", "cifar-1O"], "unknown dataset"),
    (["--eps", "abc"], "--eps: expected a number or fraction"),
    (["--eps", "-0.1"], "--eps: must be in [0, 1]"),
    (["--step-size", "2"], "--step-size: must be in [0, 1]"),
    (["--alpha", "1.5"], "--alpha: must be in [0, 1]"),
    (["--beta", "-1"], "--beta: must be >= 0"),
    # a setting another method alone reads (it was ignored, recorded, and split reports)
    (["--method", "madry", "--arch-f", "resnet18"], "--arch-f resnet18: only --method act uses"),
    (["--method", "trades", "--alpha", "0.3"], "--alpha 0.3: only --method act uses it (this"),
    (["--beta", "6"], "--beta 6.0: only --method trades uses it (this run is --method act)"),
    (["--method", "natural", "--attack-start", "uniform"], "natural training uses no adversarial"),
    (["--steps", "-1"], "--steps: must be >= 0"),
    (["--milestones", "60", "30"], "--milestones: must be strictly increasing"),
    (["--epochs", "10", "--milestones", "5", "20"], "--milestones: must lie in 1..epochs"),
    (  # a preset shortened: its milestones, and the schedule that fits
        ["--config", str(ROOT / "configs/paper/cifar10_resnet18_act.yaml"), "--epochs", "10"],
        "got [60, 120, 150] (the paper's schedule for 10 epochs: --milestones 3 6 8)",
    ),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--data-dir", "/nonexistent/folder"], "--data-dir: folder does not exist"),
    (["--resume", "/nonexistent/run"], "--resume: no checkpoint"),
    (["--nan-policy", "ignore"], "--nan-policy"),
    (["--width", "0"], "--width: must be >= 1, got 0"),
    (["--width-f", "0"], "--width-f: must be >= 1, got 0"),  # 0 once fell back to --width
    (["--width", "-3"], "--width: must be >= 1, got -3"),
    (["--widen-factor", "0"], "--widen-factor: must be >= 1"),
    (["--momentum", "1.5"], "--momentum: must be in [0, 1)"),
    (["--gamma", "0"], "--gamma: must be > 0"),
    (["--seed", "-1"], "--seed: must be in 0..2**32 - 1"),
    # flags the architecture ignored (and config.json recorded as if used)
    (["--arch", "wideresnet", "--width", "9"], "--width: wideresnet does not take it"),
    (["--arch", "small_cnn", "--depth", "40"], "--depth: small_cnn does not take it"),
    (["--arch", "wrn-28-10", "--widen-factor", "2"], "--widen-factor: wrn-28-10 does not take"),
    (["--arch-f", "wrn-28-10", "--width-f", "8"], "--width-f: wrn-28-10 does not take it"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_flags_exit_2_with_one_line(args, message, capsys):
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arch", "wideresnet", "--depth", "5"], "--arch wideresnet (model G) on digits: Wide"),
        (["--arch-f", "resnet50"], "--arch-f resnet50 (model F) on digits: resnet50 expects RGB"),
    ],
)
def test_what_a_model_refuses_is_one_line_and_leaves_no_folder(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "digits", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "run", "--fold-bn", "maybe"], "argument --fold-bn: invalid choice: 'maybe'"),
        (["train", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["bench", "--clock", "sundial"], "argument --clock: invalid choice"),
        (["trian"], "invalid choice: 'trian'"),
    ],
)
def test_flags_argparse_rejects_get_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "--help" in err
    assert len(err.splitlines()) == 1 and "usage:" not in err


def test_bad_config_files(tmp_path, capsys):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("method: act\nalpah: 0.5\n")
    assert cli.main(["train", "--config", str(bad_key)]) == 2
    assert "unknown keys: alpah; did you mean 'alpha'" in capsys.readouterr().err
    bad_yaml = tmp_path / "b.yaml"
    bad_yaml.write_text("method: act\neps: [0.1\nalpha: 0.5\n")
    assert cli.main(["train", "--config", str(bad_yaml)]) == 2
    assert "invalid YAML at line" in capsys.readouterr().err


def test_wrong_data_layout_and_offline_download(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["train", "--no-progress", "--out", str(tmp_path / "r"), "--data-dir", str(empty)]
    assert cli.main([*base, "--dataset", "cifar10", "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "cifar10 not found" in err and "train/<class>" in err
    assert cli.main([*base, "--dataset", "mnist", "--overwrite"]) == 2  # download fails offline
    assert "--data-dir" in capsys.readouterr().err


def test_bad_input_in_a_subprocess_has_no_traceback():
    res = _actrain("train", "--alpha", "2")
    assert res.returncode == 2
    assert res.stderr.strip() == "actrain train: error: --alpha: must be in [0, 1], got 2.0"


def test_unwritable_output_folder_is_caught_at_start(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(["train", *FAST, "--epochs", "1", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert "--out: cannot write to" in err and len(err.strip().splitlines()) == 1


def test_second_ctrl_c_exits_at_once(tmp_path):
    run = tmp_path / "run"
    # a slow step (wide model, many attack steps) so both signals land inside one step
    proc = _start("train", *FAST, "--method", "act", "--epochs", "50", "--width", "96",
                  "--steps", "200", "--batch-size", "512", "--out", str(run))  # fmt: skip
    _wait_for(run / "config.json", proc)  # written once data and models are built
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    # Two signals of one kind that arrive before Python runs its handler count as one, so the
    # second is sent only once the first has been handled (its message is on stderr).
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "SIGINT received" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (run / "checkpoint.pt").exists()  # no waiting for the step to finish


def test_an_output_path_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    # each once ended in a traceback, bench --all only after its whole matrix
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's")
    run = str(tmp_path / "no-run-needed")
    for argv, message in (
        (["analyze", run, "--out", str(mine)], f"--out: {mine} is a file, not a folder"),
        (["report", run, "--out", str(mine / "sub")], f"{mine} is a file, not a folder (for"),
        (["sweep", "--param", "alpha", "0.5", "--set", "dataset=digits", "--out", str(mine)],
         "is a file, not a folder"),
        (["bench", "--all", "--widths", "2", "--out", str(mine / "x.md")], "not a folder"),
        (["bench", "--all", "--widths", "2", "--out", str(tmp_path)], "is a folder"),
    ):  # fmt: skip
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert mine.read_text() == "the user's"


def test_final_weights_are_as_readable_as_the_other_run_files(tmp_path):
    # safetensors' writer kept the temporary file's 0600: other users could not read them
    import os
    import stat

    from actrain.checkpoint import atomic_write_text, save_weights
    from actrain.models import create_model

    save_weights(tmp_path / "w.safetensors", create_model("small_cnn", in_channels=1), {})
    atomic_write_text(tmp_path / "a.json", "{}")
    modes = {stat.S_IMODE(os.stat(tmp_path / f).st_mode) for f in ("w.safetensors", "a.json")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


@pytest.mark.parametrize(
    "error,rc,message",
    [
        (BrokenPipeError(32, "Broken pipe"), 141, ""),  # `actrain eval ... | head -1`
        (PermissionError(13, "Permission denied", "/data/x.png"), 2,
         "actrain eval: error: Permission denied: /data/x.png"),
    ],
)  # fmt: skip
def test_os_errors_reaching_the_cli_are_one_line(error, rc, message, monkeypatch, capsys):
    # both ended in a traceback (a closed pipe, a file the command could not read or write)
    from actrain.commands import eval as eval_command

    def fail(ns):
        raise error

    monkeypatch.setattr(eval_command, "run", fail)
    saved = os.dup(1)  # the pipe case points fd 1 at /dev/null
    try:
        assert cli.main(["eval", "run"]) == rc
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert capsys.readouterr().err.strip() == message


def test_a_run_folder_is_trained_by_one_process_at_a_time(tmp_path):
    # a sweep's re-run once started second trainers on folders its stopped sweep still trained
    from actrain.config import ConfigError
    from actrain.train import hold_run_lock

    first = hold_run_lock(tmp_path)
    with pytest.raises(ConfigError, match=f"being trained by another process \\(pid {os.getpid()}"):
        hold_run_lock(tmp_path)
    first.close()  # the run ended (or its process died): the folder is free again
    hold_run_lock(tmp_path).close()


def test_a_stopped_sweep_stops_its_runs_at_a_checkpoint(tmp_path):
    # SIGTERM/SIGINT to the sweep left its runs training (orphans) and sweep.json "running"
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "actrain", "sweep", "--param", "alpha", "0.3", "0.7"]
    argv += ["--set", "dataset=digits", "--set", "arch=small_cnn", "--set", "epochs=500"]
    argv += ["--set", "eval_every=0", "--set", "steps=1", "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / "alpha-0.3.log", out / "alpha-0.7.log"]
    deadline = time.time() + 120
    while time.time() < deadline and not all(
        p.is_file() and "epoch 1 " in p.read_text() for p in logs
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "stopped by SIGTERM" in err
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["interrupted", "interrupted"]
    assert all(r["returncode"] == 75 for r in runs)  # each wrote its checkpoint and stopped
    for r in runs:
        assert (Path(r["out"]) / "checkpoint.pt").is_file()
        assert "checkpoint written" in Path(r["log"]).read_text()


def test_under_torchrun_a_bad_flag_is_reported_once(monkeypatch, capsys):
    # each process printed the same line (twice with two processes)
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.startswith("actrain train: error: --epochs: must be >= 1")


def test_the_reproduction_script_stops_when_a_background_job_fails(tmp_path):
    # its bare `wait` returned 0: a failed evaluation gave "done" and a report without it
    fake = tmp_path / "actrain"
    fake.write_text(
        "#!/bin/bash\n"  # a stand-in: eval of the madry run fails, the rest succeeds
        'if [ "$1" = eval ]; then case "$2" in *madry) exit 1;; esac\n'
        '  prev=""; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done\n'
        '  mkdir -p "$out" && echo {} > "$out/eval.json"; fi\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    for m in ("madry", "trades", "act"):
        (out / m).mkdir(parents=True)
        (out / m / "final.json").write_text("{}")  # trained: the script goes on to evaluate
    script = ROOT / "scripts" / "repro.sh"
    env = {**os.environ, "ACTRAIN": str(fake)}
    done = subprocess.run(
        ["bash", str(script), "table2", str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert f"failed: evaluation of {out}/madry" in done.stderr and "done in" not in done.stdout


def test_weights_gone_non_finite_stop_the_run_before_they_are_scored(tmp_path, capsys):
    # lr 1e6: a finite loss wrote inf into BN statistics; with --nan-policy skip every later
    # batch was skipped and the run ended "finished", its NaN logits scored as class 0's share
    out = tmp_path / "run"
    argv = ["train", "--method", "madry", "--dataset", "digits", "--arch", "small_cnn"]
    argv += ["--train-subset", "300", "--eval-size", "64", "--steps", "2", "--epochs", "3"]
    argv += ["--lr", "1e6", "--nan-policy", "skip", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite weights after epoch 1" in err and "no checkpoint was written yet" in err
    assert not (out / "final.json").exists() and not (out / "metrics.jsonl").exists()


def test_a_model_with_non_finite_outputs_is_not_scored(tmp_path, capsys):
    from actrain.checkpoint import save_weights
    from actrain.models import create_model

    model = create_model("small_cnn", in_channels=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = tmp_path / "model_g.safetensors"
    save_weights(path, model, {"config": {"dataset": "digits", "method": "madry"}, "role": "g"})
    assert cli.main(["eval", str(path), "--test-subset", "20", "--no-progress"]) == 2
    assert "gives non-finite outputs" in capsys.readouterr().err


def test_a_guarded_run_reports_the_epoch_whose_weights_it_kept(tmp_path):
    # the report showed the collapsed epoch 5 where the guard kept epoch 4's weights
    from actrain.analysis.runs import Run

    metrics = [{"epoch": e, "test_clean_acc_g": 90.0 + e} for e in range(1, 6)]
    run = Run(tmp_path, {}, metrics=metrics, final={"final_weights_epoch": 4})
    assert run.last_eval_record()["epoch"] == 4
    assert Run(tmp_path, {}, metrics=metrics).last_eval_record()["epoch"] == 5
