"""The CLI as a new user meets it: a mistake is one line and exit code 2, nothing of the user's
is destroyed, Ctrl-C leaves nothing half made, and output to a file or a pipe is not spammed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actrain import cli
from actrain.outputs import live_progress

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset", "digits", "--arch", "small_cnn", "--width", "4", "--batch-size", "32",
    "--train-subset", "64", "--eps", "0.1", "--step-size", "0.025", "--steps", "1",
    "--precision", "fp32", "--eval-every", "0", "--device", "cpu",
]  # fmt: skip


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"actrain {command}: error: "), err
    return err


# ---------------------------------------------------------------- folders and files as flags


def test_a_file_given_as_data_dir_is_named_as_such(tmp_path, capsys):
    # it went on to a download attempt: "downloading it failed ([Errno 17] File exists: ...)"
    afile = tmp_path / "data.txt"
    afile.write_text("x")
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", str(afile)]) == 2
    assert f"--data-dir: {afile} is a file, not a folder" in _one_error_line(capsys, "train")
    # eval and analyze checked nothing: a missing folder received a download attempt
    assert cli.main(["eval", str(tmp_path / "run"), "--data-dir", str(afile)]) == 2
    assert f"--data-dir: {afile} is a file, not a folder" in _one_error_line(capsys, "eval")
    missing = tmp_path / "nowhere"
    assert cli.main(["analyze", str(tmp_path / "run"), "--data-dir", str(missing)]) == 2
    err = _one_error_line(capsys, "analyze")
    assert f"--data-dir: folder does not exist: {missing}" in err
    assert not missing.exists()


def test_a_folder_given_as_config_is_named_as_such(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path)]) == 2
    err = _one_error_line(capsys, "train")
    assert f"--config: {tmp_path} is a folder; give a YAML file" in err


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "the file sets no option"),  # trained the defaults: CIFAR-10, 200 epochs
        (b"# epochs: 5\n", "the file sets no option"),
        (b"\xff\xfe\x00binary", "not a text file"),  # a traceback (UnicodeDecodeError)
        (b"epochs: [1\n", "invalid YAML at line 2"),
        (b"epochs: 2\nfoo: 1\n", "unknown keys: foo"),
    ],
)
def test_a_broken_config_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    for command in (["train"], ["sweep", "--param", "seed", "1", "--dry-run"]):
        assert cli.main([*command, "--config", str(path), "--out", str(tmp_path / "o")]) == 2
        assert f"--config {path}: {message}" in _one_error_line(capsys, command[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_an_unknown_flag_is_named_by_its_command(capsys):
    # "actrain: error: unrecognized arguments: --eps 2 (see actrain --help)": the top parser,
    # whose help does not list the command's flags
    with pytest.raises(SystemExit) as exc:  # argparse's own exit, as for every flag mistake
        cli.main(["bench", "--eps", "2"])
    assert exc.value.code == 2
    err = _one_error_line(capsys, "bench")
    assert err.endswith("unrecognized arguments: --eps 2 (see actrain bench --help)")
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "RUN", "--stepsize", "0.01"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "actrain eval: error: unrecognized arguments: --stepsize 0.01; did you mean"
        " --step-size? (see actrain eval --help)"
    )


def test_sweep_names_the_flag_of_an_unknown_option(tmp_path, capsys):
    argv = ["sweep", "--param", "alpha", "0.5", "--set", "foo=1", "--dry-run"]
    assert cli.main([*argv, "--out", str(tmp_path / "s")]) == 2
    assert "--set: 'foo' is not a training option" in _one_error_line(capsys, "sweep")


def test_eval_of_a_file_that_holds_no_model_says_so_first(tmp_path, capsys):
    # it said "names no dataset; pass --dataset", and with --dataset then that it is no model
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert cli.main(["eval", str(afile), "--no-progress"]) == 2
    assert "is not a checkpoint or weights file" in _one_error_line(capsys, "eval")


# ------------------------------------------------------------------------- the user's files


def test_a_config_json_actrain_did_not_write_is_never_deleted(tmp_path, capsys):
    # a folder holding another program's config.json (and nothing else of a run) was taken for
    # a start that failed, and its config.json deleted
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.json").write_text('{"learning_rate": 1}')
    (folder / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert cli.main(["train", *TINY, "--out", str(folder), *extra]) == 2
        err = _one_error_line(capsys, "train")
        assert "holds a config.json that actrain did not write" in err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]
    assert (folder / "config.json").read_text() == '{"learning_rate": 1}'
    assert cli.main(["train", "--resume", str(folder)]) == 2
    assert "it is not a run folder" in _one_error_line(capsys, "train")


def test_run_files_of_another_origin_are_not_written_over(tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model_g.safetensors").write_bytes(b"someone else's")
    assert cli.main(["train", *TINY, "--out", str(folder)]) == 2
    assert "already holds model_g.safetensors" in _one_error_line(capsys, "train")
    assert (folder / "model_g.safetensors").read_bytes() == b"someone else's"


def test_resume_to_fewer_epochs_than_trained_is_refused(tmp_path, capsys):
    # it went on, said "run already finished (2/1 epochs)" and rewrote config.json to 1 epoch
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    saved = (run / "config.json").read_text()
    assert cli.main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    err = _one_error_line(capsys, "train")
    assert "has already trained 2 epochs; give --epochs 2 or more" in err
    assert (run / "config.json").read_text() == saved
    assert json.loads(saved)["epochs"] == 2
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0  # finished: fine
    assert "run already finished (2/2 epochs)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_while_the_run_starts_leaves_no_folder(tmp_path, monkeypatch, capsys):
    # only UserError cleaned up: Ctrl-C while the data loaded left a folder holding
    # .training.lock, and the next default run name got a time stamp because of it
    import actrain.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(actrain.train.Trainer, "__init__", interrupted)
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--out", str(run)]) == 130
    assert capsys.readouterr().err.strip() == "actrain train: interrupted"
    assert not run.exists()


def test_entry_after_ctrl_c_in_the_torch_import_exits_quietly(tmp_path):
    # Ctrl-C during `import torch` left torch.distributed in sys.modules; entry() took that for
    # a torchrun worker, imported torch again and ended "interrupted" with a traceback
    code = (
        "import sys, types\n"
        "import actrain.cli as c\n"
        "sys.modules['torch.distributed'] = types.ModuleType('torch.distributed')\n"
        "c.main = lambda: 130\n"
        "try:\n"
        "    c.entry()\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'actrain.distributed' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RANK": "0", "WORLD_SIZE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.split() == ["130", "False"]


def test_a_bad_image_or_ctrl_c_stops_the_decoding_threads(tmp_path, monkeypatch):
    # the pool's shutdown waited for every other chunk of images to be decoded first
    from actrain.data import datasets

    calls = []

    def decode(out, paths, start, stop):
        calls.append(start)
        if start == 0:
            raise KeyboardInterrupt
        time.sleep(0.2)

    monkeypatch.setattr(datasets, "_decode_into", decode)
    paths = [tmp_path / f"{i}.png" for i in range(4096)]
    with pytest.raises(KeyboardInterrupt):
        datasets.decode_images(paths, 8, workers=2)
    assert len(calls) <= 3  # of 8 chunks: the failing one and those already running


# ----------------------------------------------------------------------------------- output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("ACTRAIN_PROGRESS", raising=False)
    assert live_progress(True, _Terminal()) and not live_progress(False, _Terminal())
    assert not live_progress(True, io.StringIO())  # a log file, a pipe
    monkeypatch.setenv("ACTRAIN_PROGRESS", "1")
    assert live_progress(True, io.StringIO()) and not live_progress(False, io.StringIO())
    monkeypatch.setenv("ACTRAIN_PROGRESS", "0")
    assert not live_progress(True, _Terminal())


def test_training_output_to_a_file_has_no_bar_updates(tmp_path):
    # stderr to a file held every redraw of the bar, joined by carriage returns
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("ACTRAIN_PROGRESS", None)
    argv = [sys.executable, "-m", "actrain", "train", *TINY, "--batch-size", "8"]
    with open(tmp_path / "log", "w") as log:
        res = subprocess.run(
            [*argv, "--out", str(tmp_path / "run")], stdout=log, stderr=log, env=env, timeout=300
        )
    text = (tmp_path / "log").read_text()
    assert res.returncode == 0, text
    assert "\r" not in text and "batch/s" not in text
    lines = text.splitlines()
    assert lines[0].startswith("actrain: act on digits") and lines[1].startswith("epoch 1  lr")


# ------------------------------------------------------------------------------------- data


def test_a_failed_download_removes_the_data_folder_it_made(tmp_path, monkeypatch):
    # ~/.cache/actrain/data (or --data-dir's missing parents) stayed behind, empty
    from torchvision import datasets as tvd

    from actrain.data import DataError, load_split

    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision does before fetching
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    monkeypatch.setenv("ACTRAIN_DATA", str(tmp_path / "cache" / "actrain" / "data"))
    with pytest.raises(DataError, match="MNIST not found .* downloading it failed"):
        load_split("mnist", "train")
    assert list(tmp_path.iterdir()) == []


def test_an_offline_cifar100_says_not_found_and_not_downloaded(tmp_path, monkeypatch, capsys):
    from torchvision import datasets as tvd

    def offline(self):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tvd.CIFAR100, "download", offline)
    argv = ["train", "--dataset", "cifar100", "--data-dir", str(tmp_path), "--arch", "small_cnn"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = _one_error_line(capsys, "train")
    assert f"cifar100 not found under {tmp_path} and downloading it failed" in err
    assert list(tmp_path.iterdir()) == []
    assert cli.main([*argv, "--no-download", "--out", str(tmp_path / "run")]) == 2
    err = _one_error_line(capsys, "train")
    assert f"cifar100 not found under {tmp_path}" in err and "--no-download" in err


def test_a_tiny_image_folder_trains_and_evaluates(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for k in range(n):
                arr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "d" / split / cls / f"{k}.png")
    run = tmp_path / "run"
    argv = ["train", "--method", "natural", "--dataset", "imagefolder", "--arch", "small_cnn"]
    argv += ["--data-dir", str(tmp_path / "d"), "--epochs", "1", "--batch-size", "4"]
    argv += ["--num-workers", "0", "--device", "cpu", "--precision", "fp32", "--out", str(run)]
    assert cli.main(argv) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval_images"] == 4 and "val_clean_acc_g" in record
    capsys.readouterr()
    out = tmp_path / "eval.json"
    argv = ["eval", str(run), "--steps", "1", "--restarts", "1", "--json", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 4 and {"clean_acc", "robust_acc", "indices"} <= result.keys()
