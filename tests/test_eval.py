"""The evaluation suite on small real data: our attacks are at least as strong as independent
ones, the bookkeeping (restarts, early stop, minimum perturbation) is exact, an undefended
CIFAR-10 model falls to ~0%, and a model with masked gradients is caught by the sanity checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from actrain.attacks import (
    LinfBall,
    fgsm,
    fgsm_k_minimum_perturbation,
    pgd_robustness,
    pgd_search_minimum_perturbation,
)
from actrain.attacks.autoattack import autoattack
from actrain.checkpoint import save_weights
from actrain.cli import main
from actrain.data import load_split
from actrain.evaluate import robust_accuracy
from actrain.evaluation import (
    EvalOptions,
    aggregate,
    autoattack_accuracy,
    evaluate_model,
    fgsm_accuracy,
    markdown,
    minimum_perturbation,
)
from actrain.models import create_model
from actrain.runtime import gradient_model

EPS = 0.1  # digits: 8x8 images, the quickstart's training eps


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 64):
            b = perm[s : s + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    train = load_split("digits", "train")
    test = load_split("digits", "test", subset=100, seed=0)
    return train, test


@pytest.fixture(scope="module")
def digits_model(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    return _fit(model, train.images.float() / 255, train.labels, epochs=6, lr=0.05, seed=0)


@pytest.fixture(scope="module")
def digits_xy(digits):
    _, test = digits
    return test.images.float() / 255, test.labels


class RoundInput(nn.Module):
    """Gradient masking by quantisation: the input is rounded to 8 levels, so the gradient
    with respect to the input is exactly zero everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 7) / 7)


def test_pgd_at_least_as_strong_as_torchattacks_and_fgsm(digits_model, digits_xy):
    x, y = digits_xy
    kw = dict(eps=EPS, step_size=0.01, steps=20)
    ours, theirs = [], []
    for seed in range(2):  # average out the random starts of both implementations
        ours.append(robust_accuracy(digits_model, x, y, restarts=1, seed=seed, **kw))
        torch.manual_seed(seed)
        ta_pgd = torchattacks.PGD(digits_model, eps=EPS, alpha=0.01, steps=20, random_start=True)
        x_pgd = ta_pgd(x, y)
        with torch.no_grad():
            theirs.append(100 * (digits_model(x_pgd).argmax(1) == y).float().mean().item())
    mean_ours = sum(o["robust_acc"] for o in ours) / 2
    assert ours[0]["clean_acc"] > 85  # the model has learnt the task
    assert 0 < mean_ours < ours[0]["clean_acc"]
    tol = 2.0  # two examples of 100: randomness of the start points
    assert mean_ours <= sum(theirs) / 2 + tol, (mean_ours, theirs)
    # the paper's protocol (5 restarts, worst case) beats every single torchattacks run
    five = robust_accuracy(digits_model, x, y, restarts=5, seed=0, **kw)
    assert five["robust_acc"] <= min(theirs)
    x_fgsm = torchattacks.FGSM(digits_model, eps=EPS)(x, y)
    with torch.no_grad():
        ta_fgsm_acc = 100 * (digits_model(x_fgsm).argmax(1) == y).float().mean().item()
    our_fgsm = fgsm_accuracy(digits_model, x, y, eps=EPS)["robust_acc"]
    tol = 2.0  # two examples of 100: randomness of the start points
    assert max(o["robust_acc"] for o in ours) <= min(ta_fgsm_acc, our_fgsm)
    assert abs(our_fgsm - ta_fgsm_acc) <= 1.0  # same single-step attack
    # FGSM examples stay in the ball and the image box
    x_adv = fgsm(digits_model, x, y, EPS)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_worst_case_over_restarts_and_early_stop(digits_model, digits_xy):
    x, y = digits_xy
    kw = dict(eps=EPS, step_size=0.005, steps=10)
    singles = [robust_accuracy(digits_model, x, y, restarts=1, seed=s, **kw) for s in range(3)]
    worst = robust_accuracy(digits_model, x, y, restarts=3, seed=0, **kw)
    # the first restart of the 3-restart run is exactly the single run with the same seed
    assert not (worst["robust_mask"] & ~singles[0]["robust_mask"]).any()
    for one in singles:
        assert worst["robust_acc"] <= one["robust_acc"] + 1.0
    assert worst["robust_acc"] < max(s["robust_acc"] for s in singles)  # restarts help here
    full = robust_accuracy(digits_model, x, y, restarts=3, seed=0, early_stop=False, **kw)
    assert torch.equal(full["robust_mask"], worst["robust_mask"])
    assert worst["attack_passes"] < full["attack_passes"]
    # multi-targeted PGD: every target class tried, never weaker than its first target alone
    tgt = robust_accuracy(digits_model, x, y, restarts=1, seed=0, targeted=3, **kw)
    tgt1 = robust_accuracy(digits_model, x, y, restarts=1, seed=0, targeted=1, **kw)
    assert not (tgt["robust_mask"] & ~tgt1["robust_mask"]).any()
    assert tgt["robust_acc"] < tgt["clean_acc"]


def test_minimum_perturbation_is_below_every_attack_found(digits_model, digits_xy):
    x, y = digits_xy
    x, y = x[:50], y[:50]
    fk = fgsm_k_minimum_perturbation(digits_model, x, y)
    ps = pgd_search_minimum_perturbation(
        digits_model, x, y, start=fk, search_steps=6, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        clean_ok = digits_model(x).argmax(1) == y
    assert torch.equal(fk.clean_correct, clean_ok)
    assert fk.found.sum() >= 0.9 * clean_ok.sum()
    for res in (fk, ps):
        f = res.found
        # the distance is that of a real adversarial example
        with torch.no_grad():
            assert (digits_model(res.x_adv[f]).argmax(1) != y[f]).all()
        dist = (res.x_adv[f] - x[f]).flatten(1).abs().amax(1)
        assert torch.allclose(dist, res.distance[f], atol=1e-6)
        assert (res.distance[~clean_ok] == 0).all()
    # FGSM at any eps of the sweep: wherever it succeeds, FGSM^k found at most that eps
    grid = torch.linspace(0, 1, 1001)[1:]
    for e in (float(grid[49]), float(grid[99]), float(grid[199])):
        with torch.no_grad():
            broken = clean_ok & (digits_model(fgsm(digits_model, x, y, e)).argmax(1) != y)
        assert broken.any()
        assert (fk.distance[broken] <= e + 1e-6).all()
    # the PGD search is never worse than its starting point, and clearly better on average
    assert (ps.distance[fk.found] <= fk.distance[fk.found] + 1e-7).all()
    assert ps.distance[ps.found].mean() < 0.9 * fk.distance[fk.found].mean()
    # with the white-box PGD examples known, every PGD success bounds the estimate too
    pgd = robust_accuracy(digits_model, x, y, eps=0.08, step_size=0.01, steps=20, restarts=1)
    mp = minimum_perturbation(
        digits_model, x, y, search_steps=4, known_adv=pgd["x_adv"], keep_examples=True
    )
    broken = clean_ok & ~pgd["robust_mask"]
    d = torch.tensor(
        [v if v is not None else float("inf") for v in mp["pgd-search"]["per_example"]]
    )
    assert broken.any() and (d[broken] <= 0.08 + 1e-6).all()
    assert mp["fgsm-k"]["n_correct"] == int(clean_ok.sum())
    assert 0 < mp["pgd-search"]["mean"] < mp["fgsm-k"]["mean"]


class Negated(nn.Module):
    """A gradient model that lies: the model's logits negated, so it calls nearly every input
    misclassified. Shares the model's weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model(x)


def test_folded_gradients_attack_as_strongly_with_verdicts_from_the_model(digits_model, digits_xy):
    x, y = digits_xy
    view = gradient_model(digits_model, fold_bn=True)
    assert view is not digits_model and gradient_model(digits_model, fold_bn=False) is digits_model
    folded = [m for m in view.modules() if isinstance(m, nn.Conv2d)]
    assert folded and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())
    with torch.no_grad():  # the same function up to rounding; the model itself is untouched
        assert torch.allclose(view(x), digits_model(x), atol=1e-4)
    assert not digits_model.training
    assert all(p.is_contiguous() for p in digits_model.parameters())  # still NCHW
    kw = dict(eps=EPS, step_size=0.005, steps=10, restarts=2)
    accs = {}
    for fold in (False, True):
        r = robust_accuracy(digits_model, x, y, seed=0, fold_bn=fold, **kw)
        accs[fold] = r["robust_acc"]
        broken = r["clean_mask"] & ~r["robust_mask"]
        with torch.no_grad():  # every example counted broken fools the model itself
            assert (digits_model(r["x_adv"][broken]).argmax(1) != y[broken]).all()
            assert (
                digits_model(r["x_adv"][r["robust_mask"]]).argmax(1) == y[r["robust_mask"]]
            ).all()
        assert ("folded" in r["attack"]["gradients"]) == fold
    assert 0 < accs[True] < r["clean_acc"]
    assert abs(accs[True] - accs[False]) <= 2.0  # two of 100 examples: rounding of the path
    # on a CPU the folded view is the default
    assert "folded" in robust_accuracy(digits_model, x[:10], y[:10], **kw)["attack"]["gradients"]


class Shifted(nn.Module):
    """The model's logits + 1e5: the same predictions in fp32 (spacing 0.008 there); in bf16
    (spacing 512 there) the ranking is mostly rounded away."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + 100_000


def test_a_bf16_search_is_judged_in_fp32(digits_model, digits_xy):
    x, y = digits_xy
    shifted = Shifted(digits_model).eval()
    kw = dict(eps=EPS, step_size=0.01, steps=5, restarts=1, seed=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_right = (shifted(x).argmax(1) == y).float().mean().item()
    assert bf16_right < 0.5  # judged in bf16 the model would look broken
    fp32 = robust_accuracy(shifted, x, y, **kw)
    bf16 = robust_accuracy(shifted, x, y, precision="bf16", **kw)
    assert bf16["attack"]["precision"] == "bf16" and bf16["attack"]["verdicts"].startswith("fp32")
    assert bf16["clean_acc"] == fp32["clean_acc"] > 85
    with torch.no_grad():
        right = shifted(bf16["x_adv"]).argmax(1) == y
    assert torch.equal(bf16["robust_mask"], bf16["clean_mask"] & right)
    # the whole suite searches in bf16 and judges in fp32
    x, y = x[:30], y[:30]
    opts = _sanity_opts(suite="paper", precision="bf16", min_pert_search_steps=2, square_queries=50)
    res = evaluate_model(shifted, x, y, opts)
    clean = res["clean_acc"]
    assert clean == robust_accuracy(shifted, x, y, **kw)["clean_acc"] > 85
    labels = [res["pgd"]["5"]["attack"]["gradients"], res["eps_sweep"]["attack"]["gradients"],
              res["min_perturbation"]["attack"]["pgd-search"]["gradients"],
              res["black_box"]["square"]["attack"]["queries_to"]]  # fmt: skip
    assert all("bf16" in label for label in labels[:3]), labels
    assert "bf16" not in labels[3]  # Square compares scores: they stay fp32
    assert res["min_perturbation"]["pgd-search"]["n_correct"] == round(clean * 30 / 100)


def test_the_gradient_model_follows_a_moved_model(digits_xy):
    x = digits_xy[0][:8]
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8).eval()
    view = gradient_model(model, fold_bn=True)
    assert gradient_model(model, fold_bn=True) is view  # cached while nothing changed
    model.double()  # (on a GPU machine: .cuda(); the folded copies must follow)
    moved = gradient_model(model, fold_bn=True)
    assert moved is not view
    with torch.no_grad():
        assert torch.allclose(moved(x.double()), model(x.double()), atol=1e-9)


def test_verdicts_come_from_the_model_not_the_gradient_model(digits_model, digits_xy):
    x, y = digits_xy
    liar = Negated(digits_model)
    for early_stop in (True, False):
        gen = torch.Generator().manual_seed(0)
        res = pgd_robustness(digits_model, x, y, EPS, 0.01, 5, 2, early_stop=early_stop,
                             generator=gen, gradient_model=liar)  # fmt: skip
        with torch.no_grad():
            right = digits_model(res.x_adv).argmax(1) == y
        # the liar calls nearly everything misclassified; only the model's verdicts count
        assert res.robust.sum() > 50
        assert torch.equal(res.robust, res.clean_correct & right)
    mp = pgd_search_minimum_perturbation(digits_model, x[:30], y[:30], search_steps=3,
                                         generator=torch.Generator().manual_seed(0),
                                         gradient_model=liar)  # fmt: skip
    with torch.no_grad():
        assert (digits_model(mp.x_adv[mp.found]).argmax(1) != y[:30][mp.found]).all()
    # AutoAttack (APGD-CE here) queries the searcher, decides on the model
    x, y = x[:40], y[:40]
    runs = {
        name: autoattack(digits_model, x, y, 0.15, attacks=("apgd-ce",), searcher=searcher)
        for name, searcher in (("model", None), ("folded", gradient_model(digits_model, True)),
                               ("liar", liar))
    }  # fmt: skip
    for r in runs.values():
        with torch.no_grad():
            right = digits_model(r.x_adv).argmax(1) == y
        assert torch.equal(r.robust, r.clean_correct & right)
    acc = {name: int(r.robust.sum()) for name, r in runs.items()}
    assert abs(acc["folded"] - acc["model"]) <= 1 and acc["liar"] > acc["model"] + 5, acc


def _sanity_opts(**kw) -> EvalOptions:
    base = dict(
        eps=EPS,
        step_size=0.01,
        restarts=1,
        suite="sanity",
        pgd_steps=(5, 20),
        eps_sweep=(10, 50, 100),
        sweep_steps=10,
        square_queries=200,
        autoattack=False,
        progress=False,
    )
    base.update(kw)
    return EvalOptions(**base)


def test_sanity_checks_pass_on_sound_model_and_catch_masked_gradients(digits_model, digits_xy):
    x, y = digits_xy
    sound = evaluate_model(digits_model, x, y, _sanity_opts())
    assert sound["sanity"]["passed"], sound["sanity"]
    accs = [r["robust_acc"] for r in sound["eps_sweep"]["rows"]]
    assert accs[-1] == 0
    masked_model = RoundInput(digits_model).eval()
    masked = evaluate_model(masked_model, x, y, _sanity_opts())
    assert masked["clean_acc"] > 80  # quantisation alone keeps the model accurate
    status = {c["name"]: c["status"] for c in masked["sanity"]["checks"]}
    assert masked["sanity"]["passed"] is False
    assert status["white-box beats black-box"] == "FAIL"
    assert status["accuracy reaches 0 at large eps"] == "FAIL"
    # white-box PGD looks far stronger on the masked model than it is
    assert masked["pgd"]["20"]["robust_acc"] > sound["pgd"]["20"]["robust_acc"] + 20
    assert masked["black_box"]["square"]["robust_acc"] < masked["pgd"]["20"]["robust_acc"]


@pytest.fixture(scope="module")
def cifar_model(cifar_dir):
    """An undefended MLP fitted for a few seconds to 1000 real CIFAR-10 training images."""
    train = load_split("cifar10", "train", cifar_dir, subset=1000, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 256), nn.ReLU(), nn.Linear(256, 10))
    return _fit(model, train.images.float() / 255, train.labels, epochs=30, lr=0.01, seed=0)


def test_undefended_cifar10_goes_to_zero(cifar_model, cifar_dir):
    test = load_split("cifar10", "test", cifar_dir, subset=100, seed=0)
    x, y = test.images.float() / 255, test.labels
    assert len(set(y.tolist())) == 10 and test.indices.unique().numel() == 100
    r = robust_accuracy(cifar_model, x, y, eps=8 / 255, steps=20, restarts=5)
    assert r["clean_acc"] >= 30  # well above chance (10%) after a few seconds of training
    # the paper's A_rob protocol (PGD-20 x 5, step 0.003) reaches the floor that a far longer
    # attack with 2.6x the step finds, within one image; that floor is near zero. (The fitted
    # MLP differs with the CPU's fp32 kernels: 3 to 4 of its 100 images resist every attack
    # on an AVX2 CPU, so "<= 3 %" alone failed there.)
    strong = robust_accuracy(cifar_model, x, y, eps=8 / 255, step_size=2 / 255, steps=100)
    assert r["robust_acc"] <= strong["robust_acc"] + 1.0
    assert strong["robust_acc"] <= 6.0


def test_autoattack_standard_is_at_most_pgd(digits_model, digits_xy):
    x, y = digits_xy[0][:20], digits_xy[1][:20]
    eps = 0.15
    r = robust_accuracy(digits_model, x, y, eps=eps, step_size=0.01, steps=20, restarts=5)
    aa = autoattack_accuracy(digits_model, x, y, eps=eps)
    assert aa["clean_acc"] == r["clean_acc"]
    assert aa["robust_acc"] <= r["robust_acc"] < r["clean_acc"]
    after = aa["robust_acc_after"]
    assert list(after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(after.values()) == sorted(after.values(), reverse=True)  # a cascade
    assert after["square"] == aa["robust_acc"]
    assert aa["attack"]["version"] == "standard" and aa["attack"]["square_queries"] == 5000


@pytest.fixture(scope="module")
def run_files(tmp_path_factory, digits_model, digits):
    train, _ = digits
    folder = tmp_path_factory.mktemp("eval_runs")
    a = folder / "natural_a.safetensors"
    save_weights(
        a, digits_model, {"config": {"dataset": "digits", "eps": EPS, "method": "natural"}}
    )
    weak = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    weak = _fit(weak, train.images.float() / 255, train.labels, epochs=3, lr=0.05, seed=1)
    b = folder / "natural_b.safetensors"
    save_weights(b, weak, {"config": {"dataset": "digits", "eps": EPS, "method": "natural"}})
    return folder, str(a), str(b)


def test_cli_paper_suite_writes_json_markdown_and_figure(run_files, capsys):
    folder, a, _ = run_files
    out = folder / "suite"
    code = main(
        [
            "eval", a, "--suite", "paper", "--eps", "0.25", "--step-size", "0.02",
            "--test-subset", "30", "--pgd-steps", "5,20", "--restarts", "2",
            "--eps-sweep", "10,50,100", "--sweep-steps", "10", "--square-queries", "100",
            "--min-pert-search-steps", "4", "--out", str(out), "--save-examples",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    expected = load_split("digits", "test", subset=30, seed=0).indices.tolist()
    assert res["indices"] == expected
    assert res["robust_acc"] == res["pgd"]["5"]["robust_acc"] <= res["clean_acc"]
    assert res["pgd"]["20"]["robust_acc"] <= res["pgd"]["5"]["robust_acc"]
    assert (
        res["pgd"]["5"]["attack"] | {"steps": 5, "restarts": 2, "eps": 0.25}
        == res["pgd"]["5"]["attack"]
    )
    assert res["autoattack"]["robust_acc"] <= res["robust_acc"]
    assert [r["eps_255"] for r in res["eps_sweep"]["rows"]] == [10, 50, 100]
    mp = res["min_perturbation"]
    assert mp["pgd-search"]["mean"] <= mp["fgsm-k"]["mean"]
    assert mp["fgsm-k"]["n_correct"] == round(res["clean_acc"] * 30 / 100)
    assert {c["name"] for c in res["sanity"]["checks"]} >= {"AutoAttack <= PGD"}
    md = (out / "eval.md").read_text()
    assert "| Defense | Dataset | A_nat | PGD-5 | PGD-20 |" in md and "Table 5" in md
    assert (out / "examples.png").stat().st_size > 1000
    assert "Sanity checks" in capsys.readouterr().out
    # the exact command is recorded, so that a report can list what produced its numbers
    assert res["command"].startswith(f"actrain eval {a} --suite paper --eps 0.25")
    from actrain.analysis.runs import eval_command

    assert eval_command(None, res) == res["command"]  # what the report shows


def test_cli_several_runs_and_transfer(run_files, tmp_path, capsys):
    _, a, b = run_files
    common = ["--test-subset", "50", "--eps", "0.1", "--step-size", "0.01", "--no-progress"]
    js = tmp_path / "two.json"
    assert main(["eval", a, b, "--steps", "10", "--restarts", "1", "--json", str(js), *common]) == 0
    res = json.loads(js.read_text())
    accs = [r["robust_acc"] for r in res["runs"]]
    agg = res["aggregate"]["robust_acc"]
    assert agg["values"] == accs and abs(agg["mean"] - sum(accs) / 2) < 1e-9
    assert agg["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert "±" in markdown(res["runs"], aggregate(res["runs"]))
    assert all("folded" in r["attack"]["gradients"] for r in res["runs"])  # CPU default
    plain = tmp_path / "plain.json"
    argv = ["eval", a, "--steps", "10", "--restarts", "1", "--fold-bn", "off", "--json", str(plain)]
    assert main([*argv, *common]) == 0
    assert json.loads(plain.read_text())["attack"]["gradients"] == "model"
    tj = tmp_path / "transfer.json"
    assert main(["eval", "--transfer-matrix", a, b, "--json", str(tj), *common]) == 0
    t = json.loads(tj.read_text())
    rates = t["success_rate"]
    assert set(rates) == {a, b} and all(set(v) == {a, b} for v in rates.values())
    # white-box (surrogate = target) beats transfer from the other model
    assert rates[a][a] >= rates[a][b] and rates[b][b] >= rates[b][a]
    assert t["attack"]["steps"] == 20 and t["indices"] == t["indices"][:50]
    assert all("folded" in g for g in t["attack"]["gradients"].values())
    tj_plain = tmp_path / "transfer-plain.json"
    argv = ["eval", "--transfer-matrix", a, b, "--fold-bn", "off", "--json", str(tj_plain)]
    assert main([*argv, *common]) == 0
    t_plain = json.loads(tj_plain.read_text())
    assert set(t_plain["attack"]["gradients"].values()) == {"model"}
    for target in (a, b):  # the same attack up to rounding: within 2 of 50 examples
        for sur in (a, b):
            assert abs(t_plain["success_rate"][target][sur] - rates[target][sur]) <= 4.0
    assert main(["eval", "--transfer", a, "--no-progress"]) == 2
    assert main(["eval", a, "--min-pert", "foo", "--no-progress"]) == 2
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--no-progress"]) == 2  # once: "pass --dataset"
    assert "is no run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--targeted", "10"], "--targeted: at most 9 (the wrong classes of digits), got 10"),
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--precision", "fp64"], "--precision: must be one of fp32, bf16, fp16, got fp64"),
        (["--sweep-steps", "0"], "--sweep-steps: must be >= 1"),
        (["--square-queries", "-1"], "--square-queries: must be >= 0"),
        (["--num-examples", "0"], "--num-examples: must be >= 1"),
    ],
)
def test_bad_eval_numbers_are_one_line(run_files, args, message, capsys):
    # each once ended in a traceback from inside a protocol (or ran with a meaningless value)
    _, a, b = run_files
    assert main(["eval", a, "--test-subset", "20", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if args[0] in ("--batch-size", "--precision"):
        assert main(["eval", "--transfer", a, b, "--no-progress", *args]) == 2


def test_linf_ball_unchanged_for_training():
    # the evaluation suite relies on the shared threat model's projection
    ball = LinfBall(0.1, 0.01)
    x = torch.rand(2, 1, 4, 4)
    assert torch.allclose(ball.project(x + 1, x), torch.minimum(x + 0.1, torch.ones_like(x)))


def test_an_imagefolder_run_is_evaluated_and_analysed(tmp_path, monkeypatch, capsys):
    # `actrain eval` and `analyze` refused every imagefolder run (the ImageNet preset's kind)
    import numpy as np
    from PIL import Image

    from actrain.analysis.analyze import analyze_run
    from actrain.config import build_config
    from actrain.train import run_training

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for k in range(4):
                arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "data" / split / cls / f"{k}.png")
    monkeypatch.chdir(tmp_path)  # a relative --data-dir, as a user would give it
    values = {"method": "madry", "dataset": "imagefolder", "data_dir": "data", "epochs": 1}
    values |= {"arch": "small_cnn", "batch_size": 4, "steps": 1, "num_workers": 0}
    run = run_training(build_config({}, {**values, "out": str(tmp_path / "run")}))
    monkeypatch.chdir(tmp_path.parent)
    out = tmp_path / "eval.json"
    argv = ["eval", str(run), "--steps", "2", "--restarts", "1", "--json", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 8 and 0 <= res["robust_acc"] <= res["clean_acc"] <= 100
    # the folder names the data set in the tables (two folders were both "imagefolder")
    assert Path(res["data_dir"]) == (tmp_path / "data").resolve()
    from actrain.evaluation.report import markdown

    assert "| imagefolder (data) |" in markdown([res])
    assert main([*argv[:2], "--test-subset", "4", "--no-progress"]) == 0
    assert "on 4 test images" in capsys.readouterr().out
    analysis = analyze_run(run, max_samples=6, probe_epochs=1, save=False)
    assert analysis["samples"] == 6 and 0 < analysis["models"]["g"]["entropy"] < math.log(2)
    # a class folder renamed: the folder names are the labels, so neither eval nor a resume
    # may go on (eval gave numbers for permuted labels, resume trained on them)
    for split in ("train", "val"):
        (tmp_path / "data" / split / "bee").rename(tmp_path / "data" / split / "ant2")
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained on 2 classes and the data has 2 whose sorted names differ" in err
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the data's classes are not the run's" in err and "[ant, ant2]" in err
    assert len(json.loads((run / "final.json").read_text())["last"]) > 0  # nothing rewritten


def test_imagefolder_runs_refuse_subsets_train_every_batch_and_group_by_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from actrain.analysis.runs import semantic_settings
    from actrain.config import ConfigError, build_config
    from actrain.train import run_training

    base = {"method": "natural", "dataset": "imagefolder", "data_dir": str(tmp_path)}
    for flag in ("train_subset", "val_size", "test_subset"):  # they were silently ignored
        with pytest.raises(ConfigError, match="not for --dataset imagefolder"):
            build_config({}, {**base, flag: 4})
    for split in ("train", "val"):
        (tmp_path / split / "ant").mkdir(parents=True)
        arr = np.zeros((8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / split / "ant" / "0.png")
    values = {
        **base,
        "arch": "small_cnn",
        "epochs": 1,
        "num_workers": 0,
        "out": str(tmp_path / "r"),
    }
    with pytest.raises(ConfigError, match="1 image in .*, a batch of one"):
        run_training(build_config({}, values))  # it trained zero steps and said "finished"
    # two folders are two data sets; two copies of CIFAR-10 are one
    a, b = {**base, "seed": 0}, {**base, "seed": 1, "data_dir": "/other"}
    assert semantic_settings(a) != semantic_settings(b)
    c, d = {**a, "dataset": "cifar10"}, {**b, "dataset": "cifar10"}
    assert semantic_settings(c) == semantic_settings(d)


def test_a_run_given_twice_is_not_two_seeds(run_files, capsys):
    _, a, b = run_files
    assert main(["eval", a, b, a, "--no-progress"]) == 2
    assert f"run given more than once: {a}" in capsys.readouterr().err
    argv = ["eval", "--transfer", a, b, "--save-examples", "x.png", "--no-progress"]
    assert main(argv) == 2  # the figure was silently not made
    assert "--save-examples: not with --transfer" in capsys.readouterr().err


def test_the_protocols_refuse_arguments_that_failed_deep_inside(digits_model, digits_xy):
    # raw RuntimeError / KeyError / IndexError, or NaN accuracies on no examples
    from actrain.evaluation import minimum_perturbation, robust_accuracy

    x, y = digits_xy
    for kw, message in (
        ({"x": x, "y": y[:5]}, "images and y 5 labels"),
        ({"x": x[:0], "y": y[:0]}, "no examples"),
        ({"x": x[:8], "y": y[:8], "precision": "fp8"}, "precision must be"),
    ):
        with pytest.raises(ValueError, match=message):
            robust_accuracy(digits_model, kw.pop("x"), kw.pop("y"), steps=1, restarts=1, **kw)
    with pytest.raises(ValueError, match="fgsm-k and/or pgd-search"):
        minimum_perturbation(digits_model, x[:8], y[:8], methods=("foo",))


def test_one_model_under_another_path_is_not_a_second_seed(run_files, tmp_path, capsys):
    folder, a, _ = run_files
    same = f"{folder}/./natural_a.safetensors"
    assert main(["eval", a, same, "--no-progress"]) == 2
    assert f"run given more than once: {same} and {a} are one model" in capsys.readouterr().err
    # a run folder and its final weights
    from actrain.evaluation.suite import run_identity

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "digits", "method": "madry"}))
    model = create_model("small_cnn", in_channels=1, width=8)
    save_weights(run / "model_g.safetensors", model, {"config": {"dataset": "digits"}})
    key = (str(run.resolve()), "g")
    assert run_identity(run, None) == run_identity(f"{run}/", None) == key
    assert run_identity(run / "model_g.safetensors", None) == key
    assert run_identity(run, "f") != key


def test_default_step_reaches_the_ball_and_keeps_the_papers_where_it_does(digits_model, digits_xy):
    from actrain.evaluation.protocols import pgd_step_size

    assert pgd_step_size(0.031, 20) == 0.003  # the paper's protocol is untouched
    assert pgd_step_size(0.1, 100) == 0.003
    assert pgd_step_size(0.1, 20) == pytest.approx(0.0125)  # 20 x 0.003 = 0.06 < 0.1
    assert pgd_step_size(0.1, 20, 0.005) == 0.005  # a given step is kept
    x, y = digits_xy[0][:40], digits_xy[1][:40]
    auto = robust_accuracy(digits_model, x, y, eps=0.1, steps=20, restarts=1)
    given = robust_accuracy(digits_model, x, y, eps=0.1, step_size=0.0125, steps=20, restarts=1)
    weak = robust_accuracy(digits_model, x, y, eps=0.1, step_size=0.003, steps=20, restarts=1)
    assert auto["attack"]["step_size"] == pytest.approx(0.0125)
    assert auto["robust_acc"] == given["robust_acc"] <= weak["robust_acc"]


def test_sweep_rows_in_increasing_eps_and_the_checks_read_them_so(digits_model, digits_xy):
    from actrain.evaluation import eps_sweep, sanity_checks

    x, y = digits_xy[0][:30], digits_xy[1][:30]
    sweep = eps_sweep(digits_model, x, y, eps_255=(100, 25, 50), steps=10)
    assert [r["eps_255"] for r in sweep["rows"]] == [25, 50, 100]
    rows = sweep["rows"][::-1]  # a result written in another order (an older file)
    checks = sanity_checks({"n": 30, "eps_sweep": {"rows": rows}})["checks"]
    by_name = {c["name"]: c for c in checks}
    assert by_name["accuracy monotone in eps"]["passed"] is True
    assert by_name["accuracy reaches 0 at large eps"]["passed"] is True
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        eps_sweep(digits_model, x, y, eps_255=(25, 300), steps=1)


def test_a_sweep_that_stops_short_of_large_eps_skips_the_reaches_zero_check():
    # `--eps-sweep 1,2` on a sound model FAILed "reaches 0": no attack empties it at 2/255
    from actrain.evaluation import sanity_checks
    from actrain.evaluation.sanity import LARGE_EPS_255

    def status(rows: list[tuple[int, float]]) -> dict:
        sweep = {"rows": [{"eps_255": e, "robust_acc": a} for e, a in rows]}
        checks = sanity_checks({"n": 50, "eps_sweep": sweep})["checks"]
        return next(c for c in checks if c["name"] == "accuracy reaches 0 at large eps")

    short = status([(1, 80.0), (2, 70.0)])
    assert short["status"] == "skipped" and "2/255" in short["detail"]
    assert status([(50, 0.0), (LARGE_EPS_255, 4.0)])["status"] == "FAIL"
    assert status([(50, 1.0), (LARGE_EPS_255, 0.0)])["status"] == "pass"


def test_bad_sweep_eps_and_targeted_are_refused_before_any_attack(run_files, digits_model, capsys):
    _, a, _ = run_files
    assert main(["eval", a, "--eps-sweep", "25,300", "--sanity", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--eps-sweep: values are in units of 1/255, so at most 255" in err
    assert len(err.splitlines()) == 1
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(ValueError, match="has 10 classes, so at most 9 wrong ones"):
        robust_accuracy(digits_model, x, y, steps=1, restarts=1, targeted=10)


def test_attack_names_say_targeted_and_margin(run_files, capsys):
    folder, a, _ = run_files
    out = folder / "variant"
    argv = ["eval", a, "--suite", "paper", "--pgd-steps", "3", "--restarts", "1",
            "--targeted", "2", "--loss", "margin", "--test-subset", "10", "--no-autoattack",
            "--min-pert", "fgsm-k", "--eps-sweep", "25", "--sweep-steps", "2",
            "--square-queries", "0", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    assert res["robust_acc_attack"] == "PGD-3x1 targeted-2 (margin)"
    assert "PGD-3x1 targeted-2 (margin) (eps 0.1000, step 0.08333)" in printed
    md = (out / "eval.md").read_text()
    assert "| PGD-3 targeted-2 (margin) |" in md and "PGD-k targeted-2 (margin)" in md


def test_transfer_attacks_at_the_targets_training_eps(run_files, digits_model, tmp_path, capsys):
    _, natural, _ = run_files
    target = tmp_path / "madry.safetensors"
    meta = {"config": {"dataset": "digits", "eps": 0.05, "method": "madry"}}
    save_weights(target, digits_model, meta)
    out = tmp_path / "t.json"
    argv = ["eval", "--transfer", natural, str(target), "--test-subset", "10", "--json",
            str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0  # the natural surrogate's 0.1 is not the eps the target is judged at
    assert json.loads(out.read_text())["attack"]["eps"] == 0.05
    other = tmp_path / "madry2.safetensors"
    save_weights(other, digits_model, {"config": {**meta["config"], "eps": 0.1}})
    assert main(["eval", "--transfer", natural, str(target), str(other), "--no-progress"]) == 2
    assert "--eps: the runs were trained at different eps" in capsys.readouterr().err


def test_autoattack_reports_the_reference_codes_defence_checks(digits_model, digits_xy):
    x, y = digits_xy[0][:8], digits_xy[1][:8]

    class Noisy(nn.Module):  # a randomised defence
        def forward(self, v):
            return digits_model(v + 0.05 * torch.randn_like(v))

    class Probabilities(nn.Module):  # softmax outputs instead of logits
        def forward(self, v):
            return digits_model(v).softmax(1)

    plain = autoattack(digits_model, x, y, 0.1, attacks=("apgd-ce",)).flags
    noisy = autoattack(Noisy(), x, y, 0.1, attacks=("apgd-ce",)).flags
    probs = autoattack(Probabilities(), x, y, 0.1, attacks=("apgd-ce",)).flags
    assert not any("randomized" in f or "probability" in f for f in plain), plain
    assert any("randomized defense" in f for f in noisy), noisy
    assert any("output is a probability distribution" in f for f in probs), probs


def test_transfer_matrix_takes_one_path_as_a_list_of_one(run_files):
    from actrain.evaluation import transfer_matrix

    _, a, b = run_files
    one = transfer_matrix(a, b, eps=0.1, test_subset=10, progress=False)
    lists = transfer_matrix([a], [b], eps=0.1, test_subset=10, progress=False)
    assert one["surrogates"] == [a] and one["targets"] == [b]
    assert one["success_rate"] == lists["success_rate"]


def test_multi_targeted_pgd_attacks_later_targets_only_on_examples_still_standing(
    digits_model, digits_xy
):
    x, y = digits_xy[0][:60], digits_xy[1][:60]
    kw = dict(eps=0.1, step_size=0.0125, steps=10, restarts=1, seed=0)
    first = robust_accuracy(digits_model, x, y, targeted=1, **kw)
    lean = robust_accuracy(digits_model, x, y, targeted=4, **kw)
    full = robust_accuracy(digits_model, x, y, targeted=4, early_stop=False, **kw)
    assert lean["robust_acc"] <= first["robust_acc"]  # every target tried on what survives
    assert full["robust_acc"] <= first["robust_acc"]
    # the examples the first target broke cost nothing more
    assert lean["attack_passes"] < first["attack_passes"] * 4 < full["attack_passes"] * 1.01
    broken = ~lean["robust_mask"] & lean["clean_mask"]
    with torch.no_grad():
        assert (digits_model(lean["x_adv"][broken]).argmax(1) != y[broken]).all()
    assert (lean["x_adv"] - x).abs().max() <= 0.1 + 1e-6


def _threshold() -> nn.Module:
    """Two classes on one pixel: class 0 above 0.5, class 1 below."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[10.0], [-10.0]]))
        model[1].bias.copy_(torch.tensor([-5.0, 5.0]))
    return model.eval()


def test_white_box_against_transfer_counts_robust_examples_alike():
    # The check compared PGD's robust accuracy (correct clean AND adversarial) with the target's
    # accuracy on the transferred images, which also counts images it got wrong clean and the
    # perturbation put right: a transfer attack stronger than white-box PGD passed.
    from actrain.evaluation import sanity_checks, transfer_success

    model = _threshold()
    y = torch.zeros(6, dtype=torch.long)
    x = torch.tensor([0.4, 0.4, 0.6, 0.6, 0.6, 0.6]).view(6, 1, 1, 1)  # two wrong, four right
    x_adv = torch.tensor([0.6, 0.6, 0.4, 0.4, 0.6, 0.6]).view(6, 1, 1, 1)  # 2 put right, 2 broken
    t = transfer_success(model, x, x_adv, y)
    assert t["target_acc"] == pytest.approx(400 / 6)  # four right on the transferred images
    assert t["robust_acc"] == pytest.approx(200 / 6)  # two right on both
    assert t["success_rate"] == pytest.approx(200 / 6)
    # white-box PGD left all four clean-correct images robust: the transfer broke two of them
    result = {"n": 6, "pgd": {"20": {"robust_acc": 400 / 6}}, "black_box": {"transfer": {"s": t}}}
    check = sanity_checks(result)["checks"][0]
    assert check["name"] == "white-box beats black-box" and check["status"] == "FAIL", check
    assert check["black_box_acc"] == {"transfer from s": pytest.approx(200 / 6)}
