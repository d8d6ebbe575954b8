"""Issue 5: training and evaluation under torchrun, on CPU with gloo and 2 processes.

The contract proved here (docs/distributed.md): N processes with per-process batch B train the
same model, to float rounding, as 1 process with batch N*B, given the same seed (hence the
same data order), synchronised batch norm and a deterministic attack start. Checkpoints move
between process counts in both directions, a failing rank stops the job with its rank named,
and distributed evaluation returns the numbers of a single process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actrain import cli
from actrain.runtime import fold_bn_default

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("ACTRAIN_FAULT_AT", None)
# ACT, G and F with batch norm; 128 images = 4 global batches of 32 per epoch. NCHW: in
# channels_last (fp32's default on AVX2-only CPUs) batch norm over 1 and over 2 processes
# rounds differently, and PGD's sign steps turn such a rounding difference into a whole step
# on a pixel now and then (F's weights 1e-4 apart, as between NCHW and channels_last in one
# process). BN folding (on there too) keeps the two equal.
ACT = [
    "--method", "act", "--dataset", "digits", "--arch", "small_cnn", "--width", "8",
    "--train-subset", "128", "--eps", "0.1", "--step-size", "0.025", "--steps", "2",
    "--lr", "0.05", "--precision", "fp32", "--eval-every", "0", "--no-progress",
    "--device", "cpu", "--sync-bn", "--attack-start", "zero", "--epochs", "1",
    "--no-channels-last",
]  # fmt: skip
TIMEOUT = 240  # a hang would fail here instead of blocking the suite


def _torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = (), env=None):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *extra, "-m", "actrain", *args]
    # stdin from /dev/null: with pytest's stdin, workers that torchrun restarts never connect
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or ENV, timeout=TIMEOUT, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for role in ("g", "f"):
        for k, v in load_file(str(run / f"model_{role}.safetensors")).items():
            out[f"{role}.{k}"] = v
    return out


def _assert_close(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """1 process x batch 32 (in this process) and 2 processes x batch 16 (torchrun)."""
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one", root / "two"
    assert cli.main(["train", *ACT, "--batch-size", "32", "--out", str(one)]) == 0
    r = _torchrun("train", *ACT, "--batch-size", "16", "--out", str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 16 per process x 2 processes = global batch 32" in r.stderr
    return {"root": root, "one": one, "two": two}


def test_two_processes_train_the_same_weights_as_one(runs):
    _assert_close(runs["one"], runs["two"])
    # both attacked the BN-folded G where fp32 folds by default (SyncBatchNorm folds too)
    folded = fold_bn_default("fp32", torch.device("cpu"))
    for run in ("one", "two"):
        assert json.loads((runs[run] / "final.json").read_text())["runtime"]["fold_bn"] == folded
    m1 = json.loads((runs["one"] / "metrics.jsonl").read_text().splitlines()[-1])
    m2 = json.loads((runs["two"] / "metrics.jsonl").read_text().splitlines()[-1])
    for k in ("loss_g", "loss_f", "train_acc_g", "train_acc_f"):  # reduced over both ranks
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-4), k


def test_checkpoints_move_between_process_counts(runs):
    root = runs["root"]
    a, b = root / "one_then_two", root / "two_then_one"
    shutil.copytree(runs["one"], a)
    shutil.copytree(runs["two"], b)
    # written by 2 processes, continued by 1 with the same global batch ...
    assert cli.main(["train", "--resume", str(b), "--epochs", "2", "--batch-size", "32"]) == 0
    # ... and written by 1 process, continued by 2
    r = _torchrun("train", "--resume", str(a), "--epochs", "2", "--batch-size", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_close(a, b)
    assert len((a / "metrics.jsonl").read_text().splitlines()) == 2


def test_dying_rank_fails_the_job_naming_it(tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "ACTRAIN_FAULT_AT": "1:2"}
    r = _torchrun("train", *ACT, "--batch-size", "16", "--out", str(out), env=env)
    assert r.returncode != 0
    assert "rank 1/2 (local rank 1) failed: injected failure after step 2" in r.stderr
    assert not (out / "final.json").exists()


def test_max_restarts_resumes_from_the_last_checkpoint(runs, tmp_path):
    """A rank dies after step 3; torchrun restarts the job, which resumes from the checkpoint
    written at step 2 and ends where the uninterrupted 2-process run ended."""
    out = tmp_path / "run"
    env = {**ENV, "ACTRAIN_FAULT_AT": "1:3"}
    args = ("train", *ACT, "--batch-size", "16", "--checkpoint-every", "2", "--out", str(out))
    r = _torchrun(*args, extra=("--max-restarts", "1"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "injected failure after step 3" in r.stderr  # it did fail once ...
    assert (out / "final.json").exists()  # ... and the restarted job finished the run
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    _assert_close(runs["two"], out)


def test_distributed_eval_equals_single_process(tmp_path):
    run = tmp_path / "natural"
    i = ACT.index("--attack-start")  # (natural training has no attack)
    args = [a for a in ACT[:i] + ACT[i + 2 :] if a not in ("--sync-bn",)]
    args[args.index("act")] = "natural"
    args[args.index("128")] = "600"
    args[args.index("--epochs") + 1] = "3"
    assert cli.main(["train", *args, "--batch-size", "32", "--out", str(run)]) == 0
    ev = [
        "eval", str(run), "--test-subset", "150", "--batch-size", "32", "--steps", "3",
        "--restarts", "2", "--eps", "0.1", "--step-size", "0.02", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    assert cli.main([*ev, "--json", str(tmp_path / "one.json")]) == 0
    r = _torchrun(*ev, "--json", str(tmp_path / "two.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert 50 < one["clean_acc"] and 0 < one["robust_acc"] < one["clean_acc"]  # a real test
    for k in ("clean_acc", "robust_acc", "n", "indices", "attack_passes"):
        assert one[k] == two[k], k


def test_data_is_loaded_by_rank_0_first_and_its_error_ends_every_rank(tmp_path):
    # every rank downloaded the same files into the same folder at once; now rank 0 loads
    # (downloads) first, and a failure there reaches the other ranks instead of a hang
    empty = tmp_path / "data"
    empty.mkdir()
    args = [*ACT, "--dataset", "cifar10", "--data-dir", str(empty), "--no-download"]
    r = _torchrun("train", *args, "--batch-size", "16", "--out", str(tmp_path / "run"))
    assert r.returncode != 0
    assert r.stderr.count("actrain train: error: cifar10 not found under") == 1  # rank 0 only
