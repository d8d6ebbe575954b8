"""``actrain eval`` on user mistakes and on mixed inputs: a model that does not fit the data,
the model a weights file holds, runs of several configurations, output paths that cannot be
written, and the messages that say so (one line, exit 2, before any attack runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from actrain.checkpoint import save_checkpoint, save_weights
from actrain.cli import main
from actrain.data import load_split
from actrain.models import create_model

QUICK = ["--test-subset", "32", "--steps", "2", "--restarts", "1", "--step-size", "0.02"]
QUICK += ["--no-progress", "--device", "cpu"]
TRAIN = [
    "train", "--dataset", "digits", "--arch", "small_cnn", "--width", "8", "--batch-size", "64",
    "--eps", "0.1", "--step-size", "0.025", "--steps", "2", "--precision", "fp32",
    "--eval-every", "0", "--no-progress", "--device", "cpu", "--lr", "0.05",
    "--train-subset", "128", "--epochs", "1",
]  # fmt: skip
CONFIG = {"dataset": "digits", "arch": "small_cnn", "width": 8, "eps": 0.1, "epochs": 1}


def _fit(model: nn.Module, epochs: int) -> nn.Module:
    from test_eval import _fit as fit  # test_eval's SGD loop, on the digits training set

    train = load_split("digits", "train")
    return fit(model.train(), train.images.float() / 255, train.labels, epochs, 0.05, 0)


def _small(seed: int, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=num_classes, in_channels=1, width=8).eval()


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def act_run(tmp_path_factory) -> Path:
    """An ACT run folder whose G and F differ a lot: G trained, F untrained (~10 %)."""
    run = tmp_path_factory.mktemp("eval-errors") / "act_run"
    run.mkdir()
    cfg = {**CONFIG, "method": "act", "seed": 0, "out": str(run)}
    models = {"g": _fit(_small(0), epochs=4), "f": _small(1)}
    (run / "config.json").write_text(json.dumps(cfg))
    for role, m in models.items():
        save_weights(run / f"model_{role}.safetensors", m, {"config": cfg, "role": role})
    save_checkpoint(
        run / "checkpoint.pt",
        {
            "models": {r: m.state_dict() for r, m in models.items()},
            "specs": json.dumps({r: m.spec for r, m in models.items()}),
        },
    )
    return run


@pytest.fixture(scope="module")
def madry_run(tmp_path_factory) -> Path:
    """A real (tiny) Madry run: config.json, checkpoint.pt and model_g.safetensors."""
    run = tmp_path_factory.mktemp("eval-errors-madry") / "madry_run"
    assert main([*TRAIN, "--method", "madry", "--out", str(run)]) == 0
    return run


def _eval_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "r.json"
    assert main(["eval", *args, *QUICK, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _no_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any attack starts."""
    from actrain.evaluation import protocols

    def boom(*a, **k):
        raise AssertionError("an attack ran before the mistake was found")

    for name in ("robust_accuracy", "fgsm_accuracy", "autoattack_accuracy", "transfer_examples"):
        monkeypatch.setattr(protocols, name, boom)


# ---- D6: a model that does not fit the data set ------------------------------------------------
def test_model_that_does_not_fit_the_data_set_is_refused_before_any_attack(
    act_run, cifar_dir, tmp_path, monkeypatch, capsys
):
    _no_attack(monkeypatch)
    argv = ["eval", str(act_run), "--dataset", "cifar10", "--data-dir", cifar_dir, *QUICK]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.endswith(
        f"error: --dataset: {act_run} [G] does not fit cifar10: the model takes 1-channel images"
        " and predicts 10 classes, cifar10 has 3-channel images and 10 classes; evaluate it on"
        " a data set of its shape"
    )
    # another number of classes
    five = tmp_path / "five.safetensors"
    save_weights(five, _small(0, num_classes=5), {"config": {**CONFIG, "method": "madry"}})
    assert main(["eval", str(five), *QUICK]) == 2
    assert "predicts 5 classes, digits has 1-channel images and 10 classes" in _one_line(capsys)


def test_another_data_set_of_the_same_shape_is_still_allowed(act_run, shared_data, tmp_path):
    res = _eval_json(tmp_path, str(act_run), "--dataset", "mnist", "--data-dir", str(shared_data))
    assert res["dataset"] == "mnist" and res["n"] == 32 and res["clean_acc"] is not None


# ---- D7: the model a weights file holds -------------------------------------------------------
def test_a_weights_file_is_evaluated_and_labelled_as_the_model_it_holds(act_run, tmp_path, capsys):
    g = _eval_json(tmp_path, str(act_run))
    f = _eval_json(tmp_path, str(act_run), "--model", "f")
    assert g["clean_acc"] > f["clean_acc"] + 30  # the two models are told apart by numbers
    f_file = _eval_json(tmp_path, str(act_run / "model_f.safetensors"))
    assert (f_file["model"], f_file["clean_acc"]) == ("f", f["clean_acc"])
    assert f_file["label"].endswith("[F]")
    g_file = _eval_json(tmp_path, str(act_run / "model_g.safetensors"), "--model", "g")
    assert (g_file["model"], g_file["clean_acc"]) == ("g", g["clean_acc"])
    out = capsys.readouterr().out
    assert "model_f.safetensors [F]" in out and "model_g.safetensors [G]" in out
    # an explicit --model that contradicts the file
    assert main(["eval", str(act_run / "model_g.safetensors"), "--model", "f", *QUICK]) == 2
    err = _one_line(capsys)
    assert "--model f:" in err and "holds model G, not F" in err
    # without role metadata the file name says which model it is
    plain = tmp_path / "model_f.safetensors"
    save_weights(plain, _small(1), {"config": {**CONFIG, "method": "act"}})
    assert _eval_json(tmp_path, str(plain))["model"] == "f"


# ---- D13: messages ------------------------------------------------------------------------------
def test_madry_run_has_no_model_f_and_model_must_be_g_or_f(madry_run, capsys):
    assert main(["eval", str(madry_run), "--model", "f", *QUICK]) == 2
    err = _one_line(capsys)
    assert "has no model F: a madry run trains only G" in err
    assert main(["eval", str(madry_run / "checkpoint.pt"), "--model", "f", *QUICK]) == 2
    assert _one_line(capsys).endswith("checkpoint.pt holds no model F (it holds G)")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(madry_run), "--model", "x", *QUICK])
    assert exit_.value.code == 2
    assert "argument --model: invalid choice: 'x'" in _one_line(capsys)


def test_messages_keep_their_closing_quotes(madry_run, capsys):
    assert main(["eval", str(madry_run), "--pgd-steps", "x", *QUICK]) == 2
    assert _one_line(capsys).endswith("--pgd-steps: expected comma-separated integers, got 'x'")


def test_a_checkpoint_in_a_run_folder_uses_the_folder_config(madry_run, tmp_path, capsys):
    res = _eval_json(tmp_path, str(madry_run / "checkpoint.pt"))
    assert res["dataset"] == "digits" and res["method"] == "madry" and res["model"] == "g"
    assert res["eps"] == 0.1  # the run's training eps, from its config.json
    assert main(["eval", str(madry_run / "config.json"), "--dataset", "digits", *QUICK]) == 2
    err = _one_line(capsys)
    assert "config.json is not a checkpoint or weights file written by actrain" in err
    assert "weights_only" not in err


# ---- D10, D11: runs of several configurations, the robust-accuracy column ---------------------
def test_runs_are_averaged_only_within_one_configuration(act_run, shared_data, tmp_path):
    model = _fit(_small(0), epochs=1)
    paths = {}
    for name, extra in {
        "act_s0": {"method": "act", "seed": 0},
        "act_s1": {"method": "act", "seed": 1, "out": "elsewhere", "device": "cuda"},
        "madry_s0": {"method": "madry", "seed": 0},
        "act_mnist": {"method": "act", "dataset": "mnist", "data_dir": str(shared_data)},
    }.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_weights(paths[name], model, {"config": {**CONFIG, **extra}, "role": "g"})
    md = tmp_path / "all.md"
    args = [str(p) for p in paths.values()] + [str(act_run / "model_f.safetensors")]
    res = _eval_json(tmp_path, *args, "--eps", "0.1", "--markdown", str(md))
    groups = [g["runs"] for g in res["groups"]]
    assert groups == [
        [str(paths["act_s0"]), str(paths["act_s1"])],  # seeds (and where it ran) are repeats
        [str(paths["madry_s0"])],
        [str(paths["act_mnist"])],
        [str(act_run / "model_f.safetensors")],  # F is another model than G
    ]
    assert "aggregate" not in res and "robust_acc" not in res  # no mean over configurations
    assert res["groups"][0]["aggregate"]["robust_acc"]["values"] == [
        r["robust_acc"] for r in res["runs"][:2]
    ]
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Defense" not in line]
    assert len(rows) == 4 and "(mean±std of 2)" in rows[0]
    assert "| Defense | Dataset | A_nat | PGD-2x1 |" in table
    assert "| mnist |" in rows[2]
    madry = res["runs"][2]
    assert rows[1].endswith(f"| {madry['clean_acc']:.2f} | {madry['robust_acc']:.2f} |")


def test_one_run_table_names_the_attack_column(act_run, tmp_path):
    md = tmp_path / "one.md"
    res = _eval_json(tmp_path, str(act_run), "--markdown", str(md))
    table = md.read_text()
    assert "| Defense | Dataset | A_nat | PGD-2x1 |" in table
    assert f"| {res['clean_acc']:.2f} | {res['robust_acc']:.2f} |" in table
    fgsm = tmp_path / "fgsm.md"
    res = _eval_json(tmp_path, str(act_run), "--attack", "fgsm", "--markdown", str(fgsm))
    assert "| Defense | Dataset | A_nat | FGSM |" in fgsm.read_text()
    assert f"| {res['robust_acc']:.2f} |" in fgsm.read_text()


def test_runs_trained_at_different_eps_need_eps(act_run, tmp_path, monkeypatch, capsys):
    other = tmp_path / "eps.safetensors"
    save_weights(other, _small(0), {"config": {**CONFIG, "method": "act", "eps": 0.2}})
    _no_attack(monkeypatch)
    assert main(["eval", str(act_run), str(other), *QUICK]) == 2
    assert "--eps: the runs were trained at different eps" in _one_line(capsys)


# ---- D12: a surrogate from another data set ----------------------------------------------------
def test_surrogate_trained_on_another_data_set_is_refused(act_run, tmp_path, monkeypatch, capsys):
    sur = tmp_path / "mnist_run.safetensors"
    save_weights(sur, _small(0), {"config": {**CONFIG, "dataset": "mnist", "method": "madry"}})
    _no_attack(monkeypatch)
    argv = ["eval", str(act_run), "--sanity", "--no-autoattack", "--surrogate", str(sur), *QUICK]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert "--surrogate:" in err and "trained on mnist" in err and "datasets differ" in err
    assert main(["eval", "--transfer", str(sur), str(act_run), *QUICK]) == 2
    assert "datasets differ" in _one_line(capsys)  # the same rule, before loading any data


# ---- D17, D15: output paths --------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag,where,message",
    [
        ("--out", "file", "--out: {file} is a file, not a folder"),
        ("--out", "file/sub", "--out: {file} is a file, not a folder"),
        ("--json", "file/x.json", "--json: {file} is a file, not a folder"),
        ("--markdown", "file/x.md", "--markdown: {file} is a file, not a folder"),
        ("--json", "/proc/x.json", "--json: cannot write /proc/x.json"),
        ("--json", "folder", "--json: {folder} is a folder; give a file name"),
        ("--markdown", "folder", "--markdown: {folder} is a folder; give a file name"),
        ("--save-examples", "file/x.png", "--save-examples: {file} is a file, not a folder"),
        ("--save-examples", "x.txt", "--save-examples: x.txt: cannot write .txt images"),
    ],
)
def test_bad_output_paths_fail_before_any_evaluation(
    act_run, tmp_path, monkeypatch, capsys, flag, where, message
):
    from actrain.evaluation import suite

    def boom(*a, **k):
        raise AssertionError("evaluation work started")

    monkeypatch.setattr(suite, "evaluate_run", boom)
    monkeypatch.setattr(suite, "check_run", boom, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    target = where.replace("file", str(tmp_path / "file")).replace(
        "folder", str(tmp_path / "folder")
    )
    assert main(["eval", str(act_run), *QUICK, flag, target]) == 2
    expected = message.format(file=tmp_path / "file", folder=tmp_path / "folder")
    assert expected in _one_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"


def test_a_write_that_fails_after_the_evaluation_is_one_line(
    act_run, tmp_path, monkeypatch, capsys
):
    from actrain.evaluation import suite

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(suite, "write_json", full)
    monkeypatch.setattr("actrain.evaluation.write_json", full)
    assert main(["eval", str(act_run), *QUICK, "--json", str(tmp_path / "r.json")]) == 2
    err = _one_line(capsys)
    assert err.endswith(f"--json: cannot write {tmp_path / 'r.json'} (No space left on device)")


def test_default_examples_png_never_overwrites_a_file_the_user_did_not_name(
    act_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "examples.png"
    mine.write_bytes(b"my own figure")
    assert main(["eval", str(act_run), *QUICK, "--save-examples"]) == 2
    assert "examples.png exists" in _one_line(capsys)
    assert mine.read_bytes() == b"my own figure"
    # with --out it goes there
    assert main(["eval", str(act_run), *QUICK, "--save-examples", "--out", "ev"]) == 0
    assert (tmp_path / "ev" / "examples.png").stat().st_size > 1000
    assert mine.read_bytes() == b"my own figure"
    # a file the user names is theirs to overwrite
    assert main(["eval", str(act_run), *QUICK, "--save-examples", "examples.png"]) == 0
    assert mine.read_bytes() != b"my own figure"


def test_output_checks_create_nothing(tmp_path):
    from actrain.outputs import writable_dir, writable_file

    writable_file(tmp_path / "a" / "b" / "x.json", "--json")  # can be made: accepted
    writable_dir(tmp_path / "out", "--out")
    assert list(tmp_path.iterdir()) == []  # and nothing was made (the probe file is gone)


def test_the_python_evaluate_run_matches_the_cli(act_run):
    # it attacked at 8/255 where `actrain eval` took the run's training eps, and ran
    # steps=-1 / restarts=0 and recorded them as results
    from actrain.config import ConfigError
    from actrain.evaluation import evaluate_run

    res = evaluate_run(str(act_run), steps=2, restarts=1, test_subset=16, progress=False)
    trained = json.loads((act_run / "config.json").read_text())["eps"]
    assert res["eps"] == pytest.approx(trained) and trained != pytest.approx(8 / 255)
    for bad in ({"steps": -1}, {"restarts": 0}):
        with pytest.raises(ConfigError, match="--steps must be >= 0 and --restarts >= 1"):
            evaluate_run(str(act_run), **{"steps": 2, "restarts": 1, **bad}, progress=False)


def test_fp16_on_a_cpu_is_refused_by_train_and_eval_as_by_bench(tmp_path, capsys):
    # train --precision fp16 on a CPU went through PyTorch's CPU fp16 at ~3 images/s
    message = "actrain {}: error: --precision fp16: a GPU option; on a CPU"
    argv = ["train", "--dataset", "digits", "--arch", "small_cnn", "--precision", "fp16"]
    argv += ["--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert _one_line(capsys).startswith(message.format("train"))
    assert not (tmp_path / "run").exists()
    weights = tmp_path / "g.safetensors"
    save_weights(weights, _small(0), {"config": {**CONFIG, "method": "madry"}, "role": "g"})
    assert main(["eval", str(weights), *QUICK, "--precision", "fp16"]) == 2
    assert _one_line(capsys).startswith(message.format("eval"))
    assert main(["bench", "--precision", "fp16", "--device", "cpu"]) == 2
    assert _one_line(capsys).startswith(message.format("bench"))


def test_an_output_path_never_replaces_a_file_of_an_evaluated_run(
    act_run, tmp_path, monkeypatch, capsys
):
    # `--json RUN/model_g.safetensors` wrote the results over the trained weights (the next
    # eval: "not a safetensors file, or truncated"); the config, checkpoint and a surrogate's
    # files were as exposed
    _no_attack(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    for f in act_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    sur = tmp_path / "sur.safetensors"
    save_weights(sur, _small(2), {"config": {**CONFIG, "method": "madry"}, "role": "g"})
    before = {f: f.read_bytes() for f in [*run.iterdir(), sur]}
    cases = [
        ([str(run)], "--json", run / "model_g.safetensors"),
        ([str(run)], "--markdown", run / "config.json"),
        ([str(run / "model_g.safetensors")], "--json", run / "checkpoint.pt"),
        ([str(run), "--sanity", "--surrogate", str(sur)], "--json", sur),
        (["--transfer", str(sur), str(run)], "--markdown", run / "model_f.safetensors"),
    ]
    for args, flag, target in cases:
        assert main(["eval", *args, *QUICK, flag, str(target)]) == 2
        err = _one_line(capsys)
        assert f"{flag}: {target} is a file of" in err and "give another file" in err
    assert {f: f.read_bytes() for f in before} == before
