"""Issue 8: FGSM-RS and Free-AT, the training attack as a choice of every method, the
catastrophic-overfitting guard; on real digits (and synthetic CIFAR-shaped batches for the
step-for-step comparison with a plainly written loop). No timing is asserted."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import DIGITS as TRAIN_DIGITS

from actrain import bench, cli, load_model
from actrain.analysis.runs import train_command
from actrain.attacks import LinfBall, fgsm_rs
from actrain.checkpoint import load_checkpoint
from actrain.config import (
    build_config,
    load_yaml,
    resume_config,
    scheduled_epochs,
    scheduled_milestones,
)
from actrain.data import balanced_subset_indices, load_split
from actrain.guard import OverfitGuard
from actrain.losses import madry_loss
from actrain.models import create_model
from actrain.train import Trainer, prepare_run_dir, run_training

ROOT = Path(__file__).resolve().parents[1]
# test_train's digits run, with each training attack's own step size and a fixed eval step
DIGITS = {k: v for k, v in TRAIN_DIGITS.items() if k != "step_size"} | {
    "eval_size": 100,
    "eval_step_size": 0.05,  # 2.5 eps / 5, whatever the training attack
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models gain nothing from a second thread, and on a loaded machine two
    OpenMP threads wait on each other (benchmarks/README.md): one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path: Path, **kw):
    return build_config({}, {**DIGITS, "out": str(tmp_path / "run"), **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _digits_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split("digits", "test")
    return test.images[:n].float() / 255, test.labels[:n]


class Counter:
    """Counts forwards of given modules, ``Tensor.backward`` calls, ``autograd.grad`` calls and
    optimiser steps while installed (monkeypatch undoes it)."""

    def __init__(self, monkeypatch, modules: dict[str, torch.nn.Module], optimizers=None):
        self.n = {"backward": 0, "grad": 0}
        for name, m in modules.items():
            self.n[f"fwd_{name}"] = 0
            m.register_forward_hook(lambda *_, k=f"fwd_{name}": self._add(k))
        backward, grad = torch.Tensor.backward, torch.autograd.grad

        def counted_backward(t, *a, **k):
            self._add("backward")
            return backward(t, *a, **k)

        def counted_grad(*a, **k):
            self._add("grad")
            return grad(*a, **k)

        monkeypatch.setattr(torch.Tensor, "backward", counted_backward)
        monkeypatch.setattr(torch.autograd, "grad", counted_grad)
        for name, opt in (optimizers or {}).items():
            self.n[f"step_{name}"] = 0
            step = opt.step

            def counted_step(*a, _step=step, _k=f"step_{name}", **k):
                self._add(_k)
                return _step(*a, **k)

            monkeypatch.setattr(opt, "step", counted_step)

    def _add(self, key: str) -> None:
        self.n[key] += 1

    def reset(self) -> None:
        self.n = dict.fromkeys(self.n, 0)


# ---- FGSM-RS -------------------------------------------------------------------------------------
def test_fgsm_rs_is_one_step_from_the_random_start_inside_ball_and_box(monkeypatch):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    x, y = _digits_batch()
    threat = LinfBall(0.1, 0.125)

    def objective(z):
        return madry_loss(z, y) * len(y)

    count = Counter(monkeypatch, {"g": model})
    x_adv = fgsm_rs(model, x, objective, threat, generator=torch.Generator().manual_seed(7))
    assert count.n == {"backward": 0, "grad": 1, "fwd_g": 1}  # one gradient evaluation
    assert model.training  # its mode is given back
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # The same computation written out: uniform start, one signed step of 1.25 eps, projection.
    start = threat.random_perturb(x, "uniform", torch.Generator().manual_seed(7))
    model.eval()
    xs = start.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(model(xs)), [xs])
    expected = torch.clamp(torch.min(torch.max(start + 0.125 * g.sign(), x - 0.1), x + 0.1), 0, 1)
    assert torch.equal(x_adv, expected)
    # the step moved most pixels off the start (a zero step would leave x_adv == start)
    assert ((x_adv - start).abs() > 1e-3).float().mean() > 0.5


def test_fgsm_rs_start_is_uniform_over_the_ball():
    """With a flat objective (zero gradient) x_adv - x is the starting point itself."""
    eps = 0.1
    x = torch.full((256, 1, 8, 8), 0.5)  # far from the box edges: nothing is clipped
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=4)
    d = fgsm_rs(model, x, lambda z: 0 * z.sum(), LinfBall(eps, 1.25 * eps)) - x
    assert d.abs().max() <= eps + 1e-7
    assert d.min() < -0.99 * eps and d.max() > 0.99 * eps
    assert abs(float(d.mean())) < 0.003
    assert float(d.var()) == pytest.approx(eps**2 / 3, rel=0.05)  # U(-eps, eps)
    hist = torch.histc(d, bins=10, min=-eps, max=eps) / d.numel()
    assert hist.min() > 0.085 and hist.max() < 0.115  # flat: each tenth holds ~10%


@pytest.mark.parametrize(
    "method,passes",
    [
        ("madry", {"fwd_g": 2}),  # attack + update
        ("trades", {"fwd_g": 4}),  # eval-mode reference, attack, clean and adversarial
        ("act", {"fwd_g": 2, "fwd_f": 1}),  # 4 passes per step instead of 12 with PGD-10
    ],
)
def test_fgsm_rs_training_step_takes_one_gradient_on_the_methods_objective(
    tmp_path, monkeypatch, method, passes
):
    cfg = _cfg(tmp_path, method=method, train_attack="fgsm-rs", epochs=1)
    assert cfg.step_size == pytest.approx(1.25 * cfg.eps)  # Wong et al.'s default
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    x, y = next(iter(trainer.data.train.epoch(0)))
    count = Counter(monkeypatch, trainer.models)
    out = trainer.train_step(x, y)
    assert out["finite"]
    assert count.n == {"backward": 1, "grad": 1, **passes}


# ---- Free-AT -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,forwards",
    [("madry", {"fwd_g": 3}), ("trades", {"fwd_g": 6}), ("act", {"fwd_g": 3, "fwd_f": 3})],
)
def test_free_replays_each_batch_m_times_with_one_backward_each(
    tmp_path, monkeypatch, method, forwards
):
    cfg = _cfg(tmp_path, method=method, train_attack="free", replays=3, epochs=3)
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    x, y = next(iter(trainer.data.train.epoch(0)))
    count = Counter(monkeypatch, trainer.models, trainer.optimizers)
    trainer.train_step(x, y)
    steps = {f"step_{r}": 3 for r in trainer.models}
    # no attack of its own: no autograd.grad, no eval-mode forward (TRADES skips its reference)
    assert count.n == {"backward": 3, "grad": 0, **forwards, **steps}


def _shafahi_reference(model, opt, batches, eps, m):
    """Free-AT as in Shafahi et al.'s Algorithm 1, written out for Madry's loss."""
    delta = torch.zeros_like(batches[0][0])
    firsts = []
    for x, y in batches:
        n = len(y)
        for r in range(m):
            x_adv = torch.clamp(torch.min(torch.max(x + delta[:n], x - eps), x + eps), 0, 1)
            x_adv.requires_grad_(True)
            if r == 0:
                firsts.append(x_adv.detach().clone())
            model.train()
            loss = madry_loss(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            new = x_adv.detach() + eps * x_adv.grad.sign()
            delta[:n] = torch.clamp(torch.min(torch.max(new, x - eps), x + eps), 0, 1) - x
    return delta, firsts


def test_free_carries_delta_over_batches_as_in_shafahi(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, method="madry", train_attack="free", replays=2, epochs=2)
    assert cfg.step_size == cfg.eps  # Free-AT's step is eps
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    batches = list(trainer.data.train.epoch(0))
    picked = [batches[0], batches[-1]]  # a full batch, then the epoch's smaller last batch
    assert len(picked[1][1]) < len(picked[0][1])
    ref = copy.deepcopy(trainer.models["g"])
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    seen: list[torch.Tensor] = []
    trainer.models["g"].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    for x, y in picked:
        trainer.train_step(x, y)
    delta = trainer.train_attack.delta
    ref_delta, firsts = _shafahi_reference(ref, opt, picked, cfg.eps, 2)
    # carried over: the second batch's first replay starts from the first batch's delta
    x2 = picked[1][0]
    assert not torch.equal(seen[2], x2) and torch.equal(seen[2], firsts[1])
    assert delta.shape == picked[0][0].shape  # rows beyond the small batch are kept
    assert 0.5 < float((delta.abs() > 0).float().mean())
    assert delta.abs().max() <= cfg.eps + 1e-6
    assert torch.allclose(delta, ref_delta, atol=1e-6)
    for (k, a), b in zip(
        trainer.models["g"].state_dict().items(), ref.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_free_divides_epochs_and_milestones_by_m(tmp_path):
    cfg = _cfg(tmp_path, method="madry", train_attack="free", epochs=8, milestones=[4, 6])
    assert cfg.replays == 4  # the default m
    assert scheduled_epochs(cfg) == 2 and scheduled_milestones(cfg) == [1, 2]
    run = run_training(cfg)
    m = _metrics(run)
    assert [r["epoch"] for r in m] == [1, 2]
    assert [r["epochs_equivalent"] for r in m] == [4, 8]
    assert [r["lr"] for r in m] == [pytest.approx(0.05), pytest.approx(0.01)]  # 4 -> pass 1
    final = json.loads((run / "final.json").read_text())
    assert (final["epochs"], final["epochs_equivalent"], final["replays"]) == (2, 8, 4)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    # two milestones passed: lr 0.05 * 0.2^2; the carried perturbation is in the checkpoint
    assert ckpt["optimizers"]["g"]["param_groups"][0]["lr"] == pytest.approx(0.002)
    assert ckpt["train_attack"]["delta"].shape == (64, 1, 8, 8)
    assert scheduled_epochs(build_config({}, {"train_attack": "free", "epochs": 10})) == 3


# ---- every method with every training attack -----------------------------------------------------
@pytest.mark.parametrize("attack", ["pgd", "fgsm-rs", "free"])
@pytest.mark.parametrize("method", ["madry", "trades", "act"])
def test_every_method_trains_with_every_attack_on_digits(tmp_path, method, attack):
    """Four epochs of cost each (Free-AT: m = 2, so 2 passes of 2 replays), evaluated at the
    end with PGD-5 at eps 0.1, step 0.05."""
    extra = {"fgsm-rs": {}, "free": {"replays": 2}, "pgd": {"step_size": 0.025}}[attack]
    cfg = _cfg(tmp_path, method=method, train_attack=attack, epochs=4, eval_every=4, **extra)
    m = _metrics(run_training(cfg))
    assert len(m) == (2 if attack == "free" else 4)
    roles = ("g", "f") if method == "act" else ("g",)
    for r in roles:
        assert m[-1][f"loss_{r}"] < 0.9 * m[0][f"loss_{r}"], r
    assert m[-1]["test_clean_acc_g"] > 75.0  # chance is 10%
    assert m[-1]["test_pgd5_acc_g"] > 35.0  # robust accuracy too, far above chance
    if attack == "fgsm-rs":  # guarded by default, and it did not fire
        assert all("guard_pgd10_acc_g" in r and "overfit_guard" not in r for r in m)


# ---- the catastrophic-overfitting guard ----------------------------------------------------------
def test_guard_rule_keeps_best_and_fires_only_beyond_threshold(monkeypatch):
    x, y = _digits_batch()
    guard = OverfitGuard(x, y, eps=0.1, steps=3, threshold=20.0, size=32, seed=0)
    assert len(guard.y) == 32 and torch.bincount(guard.y, minlength=10).min() >= 3  # balanced
    models = {"g": torch.nn.Linear(2, 2)}
    accs = iter([50.0, 60.0, 45.0, 39.9])
    monkeypatch.setattr(guard, "robust_accuracy", lambda g, autocast=None: next(accs))
    weights = {}
    for epoch in range(1, 5):
        with torch.no_grad():
            models["g"].weight.fill_(float(epoch))
        weights[epoch] = models["g"].weight.clone()
        out = guard.check(epoch, models)
        if epoch < 4:  # 45 is 15 points below the best (60): not a collapse
            assert guard.triggered is None and "overfit_guard" not in out
    assert guard.triggered == {
        "epoch": 4, "robust_acc": 39.9, "best_epoch": 2, "best_robust_acc": 60.0,
    }  # fmt: skip
    assert torch.equal(models["g"].weight, weights[2])  # the best weights are back


def test_guard_stops_a_collapsing_run_and_keeps_the_best_weights(tmp_path, monkeypatch, capsys):
    """A real FGSM-RS run whose G is wrecked after epoch 3 (every input predicted as class 0):
    its robust accuracy collapses, the guard stops the run at that epoch and the weights of the
    best epoch before it are restored, written and resumed as finished."""
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    original = Trainer.train_epoch

    def train_epoch(self, epoch):
        stats = original(self, epoch)
        if epoch == 2:
            with torch.no_grad():
                self.models["g"].classifier.bias[0] += 1000.0
        snapshots[epoch + 1] = copy.deepcopy(self.models["g"].state_dict())
        return stats

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    cfg = _cfg(tmp_path, method="madry", train_attack="fgsm-rs", epochs=6)
    run = run_training(cfg)
    m = _metrics(run)
    assert len(m) == 3 and m[-1]["overfit_guard"] == "stopped"  # stopped at epoch 3 of 6
    accs = [r["guard_pgd10_acc_g"] for r in m]
    best_epoch = max((a, e) for e, a in enumerate(accs[:2], start=1))[1]
    assert accs[2] < max(accs[:2]) - 20 and accs[2] < 15  # the constructed collapse
    final = json.loads((run / "final.json").read_text())
    guard = final["overfit_guard"]
    assert guard["triggered"] and guard["stopped_at_epoch"] == 3
    assert guard["best_epoch"] == best_epoch == final["final_weights_epoch"]
    assert guard["best_robust_acc"] == pytest.approx(max(accs[:2]))
    written = load_file(str(run / "model_g.safetensors"))
    ckpt = load_checkpoint(run / "checkpoint.pt")["models"]["g"]
    for k, v in snapshots[best_epoch].items():
        assert torch.equal(written[k], v) and torch.equal(ckpt[k], v), k
    assert not torch.equal(written["classifier.bias"], snapshots[3]["classifier.bias"])
    # The written model really has the best epoch's robustness on the guard's batch.
    test = load_split("digits", "test")
    keep = balanced_subset_indices(test.labels, 100, seed=0)  # the run's eval set (eval_size)
    probe = OverfitGuard(test.images[keep].float() / 255, test.labels[keep], 0.1, 10, 20, 256, 0)
    assert probe.robust_accuracy(load_model(run)) == pytest.approx(max(accs[:2]))
    err = capsys.readouterr().err
    assert "overfitting guard" in err and f"epoch-{best_epoch} weights are restored" in err
    # Resuming a stopped run trains nothing more.
    run_training(resume_config(run, {}), resume=True)
    assert len(_metrics(run)) == 3
    assert "stopped by the overfitting guard" in capsys.readouterr().err


# ---- resume stays bitwise exact ------------------------------------------------------------------
@pytest.mark.parametrize("method,attack", [("madry", "free"), ("act", "fgsm-rs")])
def test_resume_is_bitwise_exact_with_fast_attacks(tmp_path, method, attack):
    """Free-AT's carried delta and the guard's best weights travel in the checkpoint."""
    kw = {"method": method, "train_attack": attack, "eval_every": 0, "epochs": 4}
    if attack == "free":
        kw["replays"] = 2  # 4 epochs of cost = 2 passes
    full = run_training(_cfg(tmp_path / "a", **kw))
    part_cfg = _cfg(tmp_path / "b", **kw)
    part_cfg.epochs = 2 if attack == "free" else 3  # same schedule, stopped one pass early
    part = run_training(part_cfg)
    run_training(resume_config(part, {"epochs": 4}), resume=True)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == (2 if attack == "free" else 4)
    for role in a["models"]:
        for k, v in a["models"][role].items():
            assert torch.equal(v, b["models"][role][k]), (role, k)
    if attack == "free":
        assert torch.equal(a["train_attack"]["delta"], b["train_attack"]["delta"])
    else:
        assert a["guard"]["best_acc"] == b["guard"]["best_acc"]
        assert a["guard"]["best_epoch"] == b["guard"]["best_epoch"]


# ---- the plain step the benchmark compares with --------------------------------------------------
@pytest.mark.parametrize("attack", ["fgsm-rs", "free"])
@pytest.mark.parametrize("method", ["madry", "trades", "act"])
def test_fp32_fast_attack_steps_equal_the_plainly_written_step(method, attack):
    spec = bench.BenchSpec(
        method=method, arch="resnet18", width=4, batch_size=8, train_attack=attack,
        replays=2 if attack == "free" else None, precision="fp32", device="cpu",
        channels_last=False, fold_bn=False,  # the plain levers (on by default on AVX2 CPUs)
    )  # fmt: skip
    cfg = spec.train_config()
    torch.manual_seed(0)
    trainer = bench.synthetic_trainer(cfg)
    ref = bench.PlainReference(cfg, in_channels=3, num_classes=10)
    ref.load_from(trainer.models)
    batches = bench.endless_batches(trainer.data.train)
    for i in range(2):  # the second step starts from the first one's delta under Free-AT
        x, y = next(batches)
        torch.manual_seed(i)
        out = trainer.train_step(x, y)
        torch.manual_seed(i)
        ref_losses = ref.step(x.contiguous(), y)
        for role, loss in ref_losses.items():
            assert torch.equal(out["losses"][role].detach(), loss), (i, role)
    for role, model in trainer.models.items():
        for (k, a), b in zip(
            model.state_dict().items(), ref.models[role].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), (role, k)
    if attack == "free":
        assert torch.equal(trainer.train_attack.delta, ref.delta)


@pytest.mark.parametrize("attack,label", [("fgsm-rs", "fgsm-rs"), ("free", "free m=2")])
def test_bench_times_the_fast_attacks(capsys, attack, label):
    args = ["bench", "--method", "madry", "--width", "2", "--batch-size", "4", "--iters", "1",
            "--warmup", "0", "--no-reference", "--device", "cpu", "--train-attack", attack,
            "--threads", "1"]  # fmt: skip
    if attack == "free":
        args += ["--replays", "2"]
    assert cli.main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["train_attack"] == attack
    assert r["attack_passes"] == (1 if attack == "fgsm-rs" else 0)
    assert r["replays"] == (2 if attack == "free" else 1)
    assert r["ms_per_update"] == pytest.approx(r["ms_per_step"] / r["replays"])
    assert (r["breakdown_ms"]["attack"] > 0) == (attack == "fgsm-rs")  # Free-AT has no attack
    assert cli.main(args) == 0
    assert f" {label} " in capsys.readouterr().out


# ---- configuration and flags ---------------------------------------------------------------------
def test_attack_dependent_defaults_and_explicit_values():
    pgd = build_config({}, {})
    assert (pgd.train_attack, pgd.step_size, pgd.replays, pgd.eval_step_size) == (
        "pgd", 0.007, 1, None,
    )  # fmt: skip
    fast = build_config({}, {"train_attack": "fgsm_rs", "eps": "8/255"})
    assert fast.train_attack == "fgsm-rs" and fast.step_size == pytest.approx(10 / 255)
    assert fast.eval_step_size == pytest.approx(2 / 255)  # 2.5 eps / 10 for the evaluation PGD
    given = build_config({"step_size": "4/255"}, {"train_attack": "fgsm-rs", "eps": "8/255"})
    assert given.step_size == pytest.approx(4 / 255)  # a step from the file counts as given
    free = build_config({}, {"train_attack": "free", "eps": "8/255"})
    assert (free.replays, free.step_size) == (4, pytest.approx(8 / 255))
    assert build_config({}, {"train_attack": "free", "replays": 1}).replays == 1


def test_train_command_round_trips_the_new_flags():
    cfg = build_config(
        {}, {"method": "act", "train_attack": "free", "replays": 8, "overfit_guard": False}
    )
    args = shlex.split(train_command(cfg.to_dict()))
    assert "--no-overfit-guard" in args and "--replays" in args
    ns = cli.build_parser().parse_args(args[1:])
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "func", "version")}
    assert build_config({}, given).to_dict() == cfg.to_dict()


def test_yes_no_settings_become_the_train_flags_that_exist():
    # the report's command and sweep's --set/--param once gave "--cuda-graphs True" and
    # "--download", which train does not take
    from actrain.sweep import _flags

    yes_no = {"model_streams": True, "fold_bn": False, "download": False}
    cfg = build_config({}, {**yes_no, "deterministic": True, "sync_bn": True})
    args = shlex.split(train_command(cfg.to_dict()))
    for flag in ("--model-streams", "--no-fold-bn", "--no-download", "--deterministic"):
        assert flag in args, flag
    ns = cli.build_parser().parse_args(args[1:])
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "func", "version")}
    assert build_config({}, given).to_dict() == cfg.to_dict()
    assert _flags("cuda_graphs", "false") == ["--no-cuda-graphs"]
    assert _flags("deterministic", "true") == ["--deterministic"]
    assert _flags("download", "true") == []  # the default: train has no --download
    assert _flags("scale_lr", "false") == []


BAD = [
    (["--train-attack", "fgsm"], "--train-attack: unknown attack 'fgsm'; did you mean 'fgsm-rs'"),
    (["--method", "natural", "--train-attack", "free"], "natural training uses no adversarial"),
    (["--replays", "4"], "--replays: only --train-attack free replays mini-batches"),
    (["--train-attack", "free", "--replays", "0"], "--replays: must be >= 1"),
    (["--train-attack", "free", "--attack-start", "uniform"], "does not apply to --train-attack"),
    (["--overfit-guard-threshold", "0"], "--overfit-guard-threshold: must be in (0, 100]"),
    (["--overfit-guard-size", "0"], "--overfit-guard-size: must be >= 1"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_fast_training_flags_exit_2_with_one_line(args, message, capsys):
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_fast_presets():
    def preset(name: str):
        values = load_yaml(ROOT / "configs" / "fast" / f"{name}.yaml")
        values.pop("data_dir", None)
        return build_config(values, {})

    fgsm = preset("cifar10_resnet18_fgsm_rs")
    assert (fgsm.method, fgsm.train_attack, fgsm.overfit_guard) == ("madry", "fgsm-rs", True)
    assert fgsm.eps == pytest.approx(8 / 255) and fgsm.step_size == pytest.approx(1.25 * fgsm.eps)
    act = preset("cifar10_resnet18_act_fgsm_rs")
    assert (act.method, act.train_attack, act.alpha) == ("act", "fgsm-rs", 0.9)
    for m, passes in ((4, 50), (8, 25)):
        free = preset(f"cifar10_resnet18_free_m{m}")
        assert (free.train_attack, free.replays, scheduled_epochs(free)) == ("free", m, passes)
        assert free.eps == pytest.approx(8 / 255)
    for name in ("fgsm_rs", "free_m4", "free_m8", "act_fgsm_rs"):
        inet = preset(f"imagenet_resnet50_{name}")
        assert (inet.arch, inet.dataset) == ("resnet50", "imagefolder")
        assert inet.eps == pytest.approx(2 / 255)
    assert preset("imagenet_resnet50_fgsm_rs").step_size == pytest.approx(2.5 / 255)
    assert scheduled_epochs(preset("imagenet_resnet50_free_m4")) == 23  # 92 epochs / 4


def test_the_free_at_header_counts_epochs_of_cost_as_run(tmp_path):
    # it said "1 epochs of cost = 1 pass" where one pass with m = 4 costs 4 epochs
    from actrain.train import attack_note

    for epochs, note in (
        (1, "(1 pass over the data = 4 epochs of cost, --epochs 1 rounded up to whole passes)"),
        (8, "(2 passes over the data = 8 epochs of cost)"),
    ):
        cfg = _cfg(tmp_path / str(epochs), method="madry", train_attack="free", epochs=epochs)
        trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
        assert note in attack_note(cfg, trainer)
