"""Analyses of trained runs (paper sections 4.6-4.8) on tiny real runs on sklearn's digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from actrain.analysis import (
    mean_entropy,
    random_label_probe,
    random_labels,
    softmax_entropy,
    weight_norms,
)
from actrain.analysis.analyze import analyze_run, training_images
from actrain.analysis.compression import extract_features
from actrain.checkpoint import load_model
from actrain.cli import main
from actrain.config import build_config
from actrain.models import create_model
from actrain.train import run_training

TINY = dict(
    dataset="digits",
    arch="small_cnn",
    width=16,
    train_subset=600,
    epochs=3,
    batch_size=32,
    lr=0.05,
    eps=0.1,
    step_size=0.05,
    steps=2,
    eval_every=1,
    eval_size=100,
    eval_steps=2,
    precision="fp32",
    device="cpu",
    progress=False,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and does not slow down on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("analysis-runs")
    out = {}
    for method in ("act", "natural"):
        cfg = build_config({}, {**TINY, "method": method, "out": str(root / method)})
        out[method] = run_training(cfg)
    return out


# ---- norms -------------------------------------------------------------------------------------
def test_norms_hand_computed_on_tiny_model():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 1)
    )
    frozen = nn.Linear(3, 3)
    frozen.weight.requires_grad_(False)
    model.append(frozen)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # 2*1*3*3 ones -> sqrt(18)
        model[3].weight.copy_(torch.tensor([[3.0, 4.0]]))  # -> 5
    rows = weight_norms(model)
    assert [r["layer"] for r in rows] == ["0", "3"]  # BatchNorm and the frozen layer excluded
    assert [r["kind"] for r in rows] == ["conv", "linear"]
    assert rows[0]["norm"] == pytest.approx(math.sqrt(18), rel=1e-12)
    assert rows[1]["norm"] == pytest.approx(5.0, rel=1e-12)
    assert rows[0]["shape"] == [2, 1, 3, 3]


def test_norms_of_trained_run_equal_torch_norms_in_network_order(runs):
    model = load_model(runs["act"], role="g")
    rows = weight_norms(model)
    assert [r["layer"] for r in rows] == ["body.0.0", "body.1.0", "body.2.0", "classifier"]
    modules = dict(model.named_modules())
    for r in rows:
        expected = float(torch.linalg.norm(modules[r["layer"]].weight.detach()))
        assert r["norm"] == pytest.approx(expected, rel=1e-6)
    assert [r["index"] for r in rows] == list(range(len(rows)))


def test_resnet18_layer_order_is_stable():
    model = create_model("resnet18", num_classes=10, in_channels=3, width=8)
    names = [r["layer"] for r in weight_norms(model)]
    assert len(names) == 21  # 17 convs in the blocks + stem + 3 projection shortcuts ... + fc
    assert names[0] == "conv1" and names[-1] == "classifier"
    assert names.index("layers.0.0.conv1") < names.index("layers.1.0.conv1")
    assert names == [r["layer"] for r in weight_norms(model)]


# ---- entropy -----------------------------------------------------------------------------------
def test_entropy_uniform_one_hot_and_hand_computed():
    assert softmax_entropy(torch.zeros(3, 7)).tolist() == pytest.approx([math.log(7)] * 3)
    one_hot = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 1000.0]])
    assert softmax_entropy(one_hot).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)

    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])

    def hand(z):
        e = [math.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        return -sum(q * math.log(q) for q in p)

    expected = (hand([1.0, 2.0, 0.0]) + hand([0.0, 0.0, 0.0])) / 2
    assert mean_entropy(lin, x, batch_size=1) == pytest.approx(expected, rel=1e-6)
    assert hand([0.0, 0.0, 0.0]) == pytest.approx(math.log(3))


def test_entropy_of_trained_model_matches_direct_softmax(runs):
    model = load_model(runs["natural"])
    train = training_images(json.loads((runs["natural"] / "config.json").read_text()))
    assert len(train) == 600  # the run's training subset
    x = train.images.float() / 255
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    direct = float((-(p * p.log()).sum(1)).mean())
    assert mean_entropy(model, x, batch_size=128) == pytest.approx(direct, rel=1e-6)
    assert 0 < direct < math.log(10)


# ---- random-label probe ------------------------------------------------------------------------
def test_random_labels_are_a_function_of_index_and_seed():
    full = random_labels(torch.arange(1000), seed=3)
    sub = torch.tensor([5, 17, 999, 2])
    assert random_labels(sub, seed=3).tolist() == full[sub].tolist()
    assert set(full.tolist()) == {0, 1}
    assert 400 < int(full.sum()) < 600
    assert not torch.equal(full, random_labels(torch.arange(1000), seed=4))


def test_probe_noise_fits_better_than_constant_and_is_deterministic():
    labels = random_labels(torch.arange(400), seed=0)
    noise = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    const = torch.ones(400, 32)
    kw = dict(epochs=15, seed=0)
    a = random_label_probe(noise, labels, **kw)
    b = random_label_probe(noise, labels, **kw)
    c = random_label_probe(const, labels, **kw)
    assert a["curve"] == b["curve"] and a["final_acc"] == b["final_acc"]
    assert len(a["curve"]) == 15
    assert c["final_acc"] == pytest.approx(c["chance_acc"], abs=0.01)  # nothing to fit
    assert a["final_acc"] > c["final_acc"] + 15
    assert random_label_probe(noise, labels, epochs=15, seed=1)["curve"] != a["curve"]


def test_probe_on_trained_features_reproducible_and_model_dependent(runs):
    cfg = json.loads((runs["act"] / "config.json").read_text())
    train = training_images(cfg, max_samples=200)
    assert len(train) == 200
    x = train.images.float() / 255
    labels = random_labels(train.indices, seed=0)
    g = extract_features(load_model(runs["act"], "g"), x)
    nat = extract_features(load_model(runs["natural"], "g"), x)
    assert g.shape == (200, 64)  # small_cnn width 16 -> 4 * 16 features
    kw = dict(epochs=10, batch_size=32, seed=0)
    r1 = random_label_probe(g, labels, **kw)
    r2 = random_label_probe(g, labels, **kw)
    r3 = random_label_probe(nat, labels, **kw)
    assert r1["curve"] == r2["curve"] and r1["loss_curve"] == r2["loss_curve"]
    assert r1["loss_curve"] != r3["loss_curve"]
    assert r1["curve"] != r3["curve"]


def test_analyze_run_and_cli(runs, tmp_path, capsys):
    res = analyze_run(runs["act"], max_samples=150, probe_epochs=3)
    saved = json.loads((runs["act"] / "analysis" / "analysis.json").read_text())
    assert saved["models"].keys() == {"g", "f"} == res["models"].keys()
    assert saved["samples"] == 150
    assert saved["num_classes"] == 10  # digits: the report's log(C) reference
    for role in ("g", "f"):
        model = load_model(runs["act"], role)
        norms = [
            float(torch.linalg.norm(p.detach()))
            for n, p in model.named_parameters()
            if "weight" in n and p.dim() > 1
        ]
        assert [r["norm"] for r in saved["models"][role]["norms"]] == pytest.approx(norms)
        assert 0 < saved["models"][role]["entropy"] < math.log(10)
        assert len(saved["models"][role]["probe"]["curve"]) == 3

    out = tmp_path / "analysis-out"
    rc = main(
        [
            "analyze",
            str(runs["natural"]),
            "--max-samples",
            "100",
            "--probe-epochs",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "natural" in printed and "G" in printed
    html = (out / "analysis.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # norms, probe curves, entropy bars
    assert (out / "entropy.png").stat().st_size > 1000
    assert main(["analyze", str(runs["natural"]), "--model", "f"]) == 2  # no F in a natural run
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    for argv in (
        ["analyze", str(runs["natural"]), "--probe-lr", "-1"],  # once torch's traceback
        ["report", str(runs["natural"]), "--out", str(tmp_path / "r"), "--max-samples", "1"],
        ["report", str(runs["natural"]), "--out", str(tmp_path / "r"), "--probe-epochs", "0"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and argv[-2] in err
    assert not (tmp_path / "r").exists()
