"""Config parsing: fractions, YAML files with flag overrides, defaults, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from actrain.config import ConfigError, build_config, load_yaml, paper_milestones, parse_fraction

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text,value",
    [("8/255", 8 / 255), ("0.031", 0.031), (" 2 / 255 ", 2 / 255), (0.5, 0.5), (1, 1.0)],
)
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("bad", ["abc", "1/0", "8/", True])
def test_parse_fraction_rejects(bad):
    with pytest.raises(ConfigError, match="expected a number or fraction"):
        parse_fraction(bad, "--eps")


def test_yaml_with_flag_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: trades\neps: 8/255\nsteps: 7\nepochs: 50\nbeta: 6\n")
    cfg = build_config(load_yaml(path), {"steps": 3, "step-size": None, "step_size": "2/255"})
    assert cfg.method == "trades" and cfg.beta == 6.0
    assert cfg.eps == pytest.approx(8 / 255)
    assert cfg.step_size == pytest.approx(2 / 255)
    assert cfg.steps == 3  # the flag wins over the file
    assert cfg.epochs == 50 and cfg.milestones == [15, 30, 38]
    assert cfg.weight_decay == 2e-4  # TRADES' recipe


def test_defaults_are_the_paper_setup():
    cfg = build_config({}, {})
    assert (cfg.method, cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr) == (
        "act", "resnet18", 200, 128, 0.1,
    )  # fmt: skip
    assert cfg.milestones == [60, 120, 150] and cfg.gamma == 0.2
    assert (cfg.eps, cfg.step_size, cfg.steps) == (0.031, 0.007, 10)
    assert (cfg.alpha, cfg.temperature, cfg.attack_temperature) == (0.9, 4.0, 1.0)
    assert cfg.attack_kl_reduction == "sum" and cfg.weight_decay == 5e-4
    assert paper_milestones(100) == [30, 60, 75]


def test_every_preset_parses():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 24
    assert len([f for f in files if f.parent.name == "fast"]) == 8  # issue 8's presets
    for f in files:
        values = load_yaml(f)
        values.pop("data_dir", None)  # placeholders for the user's own folders
        cfg = build_config(values, {})
        assert cfg.epochs >= 1, f
    act = build_config(load_yaml(ROOT / "configs/paper/cifar10_resnet18_act.yaml"), {})
    assert (act.method, act.alpha, act.epochs, act.milestones) == ("act", 0.9, 200, [60, 120, 150])
    inet = load_yaml(ROOT / "configs/paper/imagenet_resnet50_act.yaml")
    inet.pop("data_dir")
    inet = build_config(inet, {})
    assert (inet.arch, inet.alpha, inet.eps, inet.step_size) == (
        "resnet50", 0.5, pytest.approx(2 / 255), pytest.approx(1 / 255),
    )  # fmt: skip


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match="--epochs: invalid value 'ten'"):
        build_config({"epochs": "ten"}, {})
    with pytest.raises(ConfigError, match="--milestones: expected integers"):
        build_config({}, {"milestones": "a b"})


def test_yaml_booleans_are_not_numbers(tmp_path):
    for text in ("batch_size: true\n", "alpha: yes\n", "milestones: true\n"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="invalid value True"):
            build_config(load_yaml(path), {})


def test_milestones_with_no_value_mean_a_constant_lr(tmp_path):
    from actrain.cli import build_parser

    ns = build_parser().parse_args(["train", "--epochs", "1", "--milestones"])
    assert ns.milestones == []
    assert build_config({}, {"epochs": 1, "milestones": ns.milestones}).milestones == []


def test_resuming_to_fewer_epochs_than_the_schedule_says_what_works(tmp_path):
    # it advised --milestones, which a resume refuses
    from actrain.config import resume_config

    cfg = build_config({}, {"dataset": "digits", "epochs": 6})  # milestones [2, 4]
    (tmp_path / "config.json").write_text(cfg.to_json())
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"resume with --epochs 4 or more"):
        resume_config(tmp_path, {"epochs": 2})
    assert resume_config(tmp_path, {"epochs": 8}).epochs == 8
