"""Training end to end on real data: every method learns, ACT is the method of the paper."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from actrain import load_model
from actrain.checkpoint import load_checkpoint
from actrain.config import build_config, resume_config
from actrain.data import load_split
from actrain.evaluate import robust_accuracy
from actrain.runtime import fp32_levers_pay
from actrain.train import Trainer, prepare_run_dir, run_training

DIGITS = {
    "dataset": "digits",
    "arch": "small_cnn",
    "width": 16,
    "batch_size": 64,
    "lr": 0.05,
    "eps": 0.1,
    "step_size": 0.025,
    "steps": 5,
    "precision": "fp32",
    "progress": False,
    "eval_size": 200,
    "eval_steps": 5,
    "device": "cpu",
}


def _cfg(tmp_path: Path, **kw):
    values = {**DIGITS, "out": str(tmp_path / "run"), **kw}
    return build_config({}, values)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """One short run per method on digits, shared by the tests below."""
    runs = {}
    for method in ("natural", "madry", "trades", "act"):
        out = tmp_path_factory.mktemp(method)
        cfg = build_config({}, {**DIGITS, "method": method, "epochs": 6, "out": str(out / "r")})
        runs[method] = run_training(cfg)
    return runs


@pytest.mark.parametrize("method", ["natural", "madry", "trades", "act"])
def test_every_method_learns_on_digits(digits_runs, method):
    m = _metrics(digits_runs[method])
    assert len(m) == 6
    roles = ("g", "f") if method == "act" else ("g",)
    for r in roles:
        assert m[-1][f"loss_{r}"] < 0.7 * m[0][f"loss_{r}"]
        assert m[-1][f"test_clean_acc_{r}"] > 60.0  # chance is 10%


def test_act_g_more_robust_than_natural(digits_runs):
    test = load_split("digits", "test")
    x = test.images.float() / 255
    accs = {}
    for method in ("natural", "act"):
        model = load_model(digits_runs[method])
        accs[method] = robust_accuracy(
            model, x, test.labels, eps=0.15, step_size=0.02, steps=20, restarts=2
        )["robust_acc"]
    assert accs["act"] > accs["natural"] + 20, accs


def test_run_folder_contents_and_load_model_round_trip(digits_runs):
    run = digits_runs["act"]
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "final.json",
        "model_g.safetensors",
        "model_f.safetensors",
    ):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "act" and cfg["alpha"] == 0.9 and cfg["temperature"] == 4.0
    rec = _metrics(run)[-1]
    for key in (
        "lr",
        "loss_g",
        "loss_f",
        "train_acc_g",
        "train_acc_f",
        "test_clean_acc_g",
        "test_pgd5_acc_g",
        "test_clean_acc_f",
        "train_seconds",
        "images_per_s",
    ):
        assert key in rec, key
    # what the run resolved its settings to: in each record and in final.json
    assert rec["device"] == "cpu" and rec["precision"] == "fp32"
    runtime = json.loads((run / "final.json").read_text())["runtime"]
    assert runtime["device"] == "cpu" and runtime["precision"] == "fp32"
    levers = fp32_levers_pay(torch.device("cpu"))  # fp32's channels_last and BN folding
    assert runtime["channels_last"] is levers and runtime["fold_bn"] is levers
    assert runtime["fused_bn"] is False
    assert runtime["attack_start"] == "gaussian" and runtime["overfit_guard"] is False
    ckpt = load_checkpoint(run / "checkpoint.pt")
    g = load_model(run)
    f = load_model(run, role="f")
    assert not g.training and not f.training
    for role, model in (("g", g), ("f", f)):
        for k, v in model.state_dict().items():
            assert torch.equal(v, ckpt["models"][role][k]), k
    g2 = load_model(run / "model_g.safetensors")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(g(x), g2(x))


def _released_pgd(g, x, start, objective, eps, step_size, steps):
    """PGD as the released ACT and TRADES code write it: G in eval mode, signed steps,
    projection onto the eps-ball and [0, 1], G back in train mode."""
    g.eval()
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = objective(g(x_adv))
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    g.train()
    return x_adv.detach()


def _reference_act_step(g, f, opt_g, opt_f, x, y, cfg):
    """One ACT step written out independently of actrain, as the authors' released code does it
    (train_act.py, utilities/losses.py): F(x) once in train mode; the attack maximises
    (1 - a) CE(G(x'), y) + a KL(F(x) || G(x')) with the KL summed over the batch, from
    x + 0.001 N(0, I), on G in eval mode; then L_F and L_G at temperature T with the T^2 scale
    and the KL averaged over the batch, each with the other model's output detached; F's step,
    then G's, both from the outputs computed before either step (Algorithm 1)."""
    a, t = cfg.alpha, cfg.temperature
    g.train()
    f.train()
    nat_out = f(x)
    # (the released code evaluates its first gradient at the unprojected start; actrain
    # projects the start into the ball and the image box first)
    start = (x + 0.001 * torch.randn(x.shape)).clamp(0.0, 1.0)

    def objective(out):
        ce = torch.nn.functional.cross_entropy(out, y)
        kl = torch.nn.functional.kl_div(
            out.log_softmax(1), nat_out.detach().softmax(1), reduction="sum"
        )
        return (1 - a) * ce + a * kl

    x_adv = _released_pgd(g, x, start, objective, cfg.eps, cfg.step_size, cfg.steps)
    adv_out = g(x_adv)

    def distillation(student, teacher):
        p, q = (student / t).log_softmax(1), (teacher / t).softmax(1)
        kl = torch.nn.functional.kl_div(p, q, reduction="sum")
        return kl * t**2 / student.shape[0]

    ce = torch.nn.functional.cross_entropy
    loss_f = (1 - a) * ce(nat_out, y) + a * distillation(nat_out, adv_out.detach())
    loss_g = (1 - a) * ce(adv_out, y) + a * distillation(adv_out, nat_out.detach())
    opt_f.zero_grad()
    opt_g.zero_grad()
    loss_f.backward()
    opt_f.step()
    loss_g.backward()
    opt_g.step()
    return {"g": loss_g.detach(), "f": loss_f.detach()}, {"g": adv_out.detach(), "f": nat_out}


def test_act_step_matches_algorithm_1(tmp_path):
    """The shared loop's ACT step on the plain fp32 path against the step written out above:
    same losses, same logits for the metrics (G on x + delta*, F on x, before the update),
    same weights and BN statistics after the two SGD steps."""
    cfg = _cfg(tmp_path, method="act", epochs=1, channels_last=False, fold_bn=False)
    run = prepare_run_dir(cfg, overwrite=False)
    trainer = Trainer(cfg, run)
    g0 = copy.deepcopy(trainer.models["g"])
    f0 = copy.deepcopy(trainer.models["f"])
    opt_g = torch.optim.SGD(g0.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    opt_f = torch.optim.SGD(f0.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    x, y = next(iter(trainer.data.train.epoch(0)))
    for _ in range(2):  # the second step also checks the momentum buffers
        state = torch.get_rng_state()
        out = trainer.train_step(x, y)
        torch.set_rng_state(state)
        losses, logits = _reference_act_step(g0, f0, opt_g, opt_f, x, y, cfg)
        for r in ("g", "f"):
            assert torch.allclose(out["losses"][r], losses[r], rtol=1e-5, atol=1e-6), r
            assert torch.allclose(out["logits"][r], logits[r], atol=1e-5), r
    for ours, ref in ((trainer.models["g"], g0), (trainer.models["f"], f0)):
        for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    # F ran forward once per step in train mode (one BN update); G once on x + delta* (the
    # attack ran in eval mode)
    for model in trainer.models.values():
        tracked = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
        assert tracked and all(int(t) == 2 for t in tracked)


def test_madry_and_trades_steps_match_their_references(tmp_path):
    """Madry: CE attack from a uniform start, CE on the adversarial batch only. TRADES
    (Zhang et al.'s trades_loss): attack on KL(f(x) || f(x')) with f(x) from the model in eval
    mode, from x + 0.001 N(0, I); loss CE(f(x), y) + beta KL(f(x) || f(x')) / batch with
    gradients through both sides."""
    nn_f = torch.nn.functional
    for method in ("madry", "trades"):
        cfg = _cfg(tmp_path / method, method=method, epochs=1, channels_last=False, fold_bn=False)
        trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
        g = copy.deepcopy(trainer.models["g"])
        opt = torch.optim.SGD(
            g.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
        x, y = next(iter(trainer.data.train.epoch(0)))
        state = torch.get_rng_state()
        out = trainer.train_step(x, y)
        torch.set_rng_state(state)
        g.train()
        if method == "madry":
            start = (x + (2 * torch.rand(x.shape) - 1) * cfg.eps).clamp(0.0, 1.0)
            objective = lambda o: nn_f.cross_entropy(o, y, reduction="sum")  # noqa: E731
            x_adv = _released_pgd(g, x, start, objective, cfg.eps, cfg.step_size, cfg.steps)
            logits = g(x_adv)
            loss = nn_f.cross_entropy(logits, y)
        else:
            with torch.no_grad():
                g.eval()
                log_ref = g(x).log_softmax(1)
                g.train()
            start = (x + 0.001 * torch.randn(x.shape)).clamp(0.0, 1.0)

            # KL summed over the batch, written as exp(log p) (log p - log q) from log-softmaxes:
            # near x the TRADES objective is flat and its input gradient at noise level, so any
            # other rounding (kl_div, softmax().log()) flips the signs of some of its entries
            def objective(o):
                return (log_ref.exp() * (log_ref - o.log_softmax(1))).sum()

            x_adv = _released_pgd(g, x, start, objective, cfg.eps, cfg.step_size, cfg.steps)
            # one train-mode pass of x, as actrain: Zhang et al.'s code runs model(x) twice
            # (for the CE and for the KL), which gives the same gradient and moves the BN
            # running statistics once more
            clean = g(x)
            logits = g(x_adv)
            kl = nn_f.kl_div(logits.log_softmax(1), clean.softmax(1), reduction="sum")
            loss = nn_f.cross_entropy(clean, y) + cfg.beta * kl / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.allclose(out["losses"]["g"], loss.detach(), rtol=1e-5), method
        assert torch.allclose(out["logits"]["g"], logits.detach(), atol=1e-5), method
        for (k, a), b in zip(
            trainer.models["g"].state_dict().items(), g.state_dict().values(), strict=True
        ):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), (method, k)


def test_resume_continues_from_saved_epoch_bitwise(tmp_path):
    full = run_training(_cfg(tmp_path / "a", method="act", epochs=3, eval_every=0))
    part_cfg = _cfg(tmp_path / "b", method="act", epochs=3, eval_every=0)
    part_cfg.epochs = 2  # the same schedule (milestones of a 3-epoch run), stopped after 2
    part = run_training(part_cfg)
    assert len(_metrics(part)) == 2
    cfg = resume_config(part, {"epochs": 3})
    run_training(cfg, resume=True)
    m = _metrics(part)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert b["epoch"] == 3
    for role in ("g", "f"):
        for k, v in a["models"][role].items():
            assert torch.equal(v, b["models"][role][k]), (role, k)


def test_cifar10_subset_every_method_learns(cifar_dir, tmp_path):
    """600 real CIFAR-10 images: loss falls and clean accuracy beats chance."""
    for method in ("natural", "madry", "trades", "act"):
        cfg = build_config(
            {},
            {
                "method": method,
                "dataset": "cifar10",
                "data_dir": cifar_dir,
                "arch": "resnet18",
                "width": 8,
                "train_subset": 600,
                "test_subset": 200,
                "eval_size": 200,
                "eval_steps": 3,
                "epochs": 8,
                "milestones": [],
                "batch_size": 50,
                "lr": 0.05,
                "steps": 2,
                "eps": 8 / 255,
                "step_size": 4 / 255,
                "progress": False,
                "device": "cpu",
                "out": str(tmp_path / method),
            },
        )
        m = _metrics(run_training(cfg))
        assert m[-1]["loss_g"] < m[0]["loss_g"], method
        assert m[-1]["test_clean_acc_g"] > 15.0, (method, m[-1])


def test_a_last_batch_of_one_image_waits_for_the_next_epoch():
    # batch norm cannot train on one image (PyTorch raised mid-epoch): 22 images in batches of
    # 7 give three batches of 7; any other remainder stays a batch of its own
    from actrain.train import build_data

    for batch, sizes in ((7, [7, 7, 7]), (8, [8, 8, 6]), (11, [11, 11])):
        cfg = build_config({}, {"dataset": "digits", "train_subset": 22, "batch_size": batch})
        loader = build_data(cfg, torch.device("cpu"), channels_last=False).train
        assert [len(y) for _, y in loader.epoch(0)] == sizes and len(loader) == len(sizes)
        seen = torch.cat([loader.epoch_order(e) for e in range(4)])
        if batch == 7:  # the image left out differs from epoch to epoch
            assert len(seen.unique()) == 22


def test_batch_size_one_is_refused_only_where_batch_norm_would_see_one_value(tmp_path, capsys):
    from actrain import cli
    from actrain.models import create_model
    from actrain.train import single_value_batch_norm

    image = torch.rand(1, 1, 8, 8)
    assert single_value_batch_norm(create_model("small_cnn", in_channels=1), image) is None
    resnet = create_model("resnet18", in_channels=1, width=4)
    assert single_value_batch_norm(resnet, image) == "layers.3.0.bn1"  # 1x1 at the last stage
    assert resnet.training  # the check leaves the model as it found it
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--batch-size", "1", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--batch-size 1: resnet18's batch norm 'layers.3.0.bn1'" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_finished_run_resumed_past_its_final_weights_evaluates_its_checkpoint(tmp_path):
    # resumed for more epochs and stopped: `actrain eval RUN` took the old final weights and
    # final.json still said finished
    run = run_training(_cfg(tmp_path, method="act", epochs=1, eval_every=0))
    old = load_model(run, "g").state_dict()
    trainer = Trainer(resume_config(run, {"epochs": 3}), run, resume=True)
    trainer.train_epoch(1)
    trainer.epoch = 2
    trainer.save_checkpoint()  # what an interrupted resume leaves behind
    final = json.loads((run / "final.json").read_text())
    assert final["status"] != "finished" and final["checkpoint_epoch"] == 2
    now = load_model(run, "g").state_dict()
    for k, v in trainer.models["g"].state_dict().items():
        assert torch.equal(now[k], v), k
    assert any(not torch.equal(old[k], now[k]) for k in old)
    trainer.fit()  # the resumed run finishes: its final weights are the ones read again
    assert json.loads((run / "final.json").read_text())["status"] == "finished"
    assert load_model(run, "g").meta["epochs_trained"] == 3


def test_a_relative_data_dir_is_recorded_absolute(tmp_path, monkeypatch):
    # recorded as given, `actrain eval RUN` from another folder looked for the data there
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    run = run_training(_cfg(tmp_path, epochs=1, eval_every=0, data_dir="data"))
    saved = json.loads((run / "config.json").read_text())["data_dir"]
    assert saved == str(tmp_path.resolve() / "data")


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_the_command(tmp_path):
    # a crash in the first epoch (a bad image) left config.json alone, and the same command
    # then said "already holds a run" while --resume said "no checkpoint"
    from actrain.config import ConfigError

    cfg = _cfg(tmp_path, epochs=1, eval_every=0)
    run = Path(cfg.out)
    run.mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    with pytest.raises(ConfigError, match="start it again without --resume"):
        resume_config(run, {})
    (run / "notes.txt").write_text("mine")  # a user's file beside it stays
    assert run_training(cfg) == run and (run / "model_g.safetensors").is_file()
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="already holds a run"):  # a real run is kept
        run_training(_cfg(tmp_path, epochs=1, eval_every=0))


def test_overwrite_never_touches_a_live_run_and_keeps_the_old_results_aside(tmp_path):
    # --overwrite deleted a training run's files before the lock refused it; and the replaced
    # run's eval/ and analysis/ stayed where the report credited them to the new run
    from actrain.config import ConfigError
    from actrain.train import hold_run_lock

    run = run_training(_cfg(tmp_path, epochs=1, eval_every=0))
    (run / "eval").mkdir()
    (run / "eval" / "pgd.json").write_text("{}")
    (run / "analysis").mkdir()
    live = hold_run_lock(run)  # another process training it
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ConfigError, match="being trained by another process"):
        run_training(_cfg(tmp_path, epochs=1, eval_every=0), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before
    live.close()
    run_training(_cfg(tmp_path, epochs=1, eval_every=0, method="natural"), overwrite=True)
    names = {p.name for p in run.iterdir()}
    assert "eval" not in names and "analysis" not in names
    assert any(n.startswith("eval.replaced-") for n in names)
    assert json.loads((run / "config.json").read_text())["method"] == "natural"


def test_bf16_on_a_cpu_without_onednn_bf16_trains_and_says_so(tmp_path, capsys, monkeypatch):
    # AVX2-only CPUs: oneDNN's own bf16 ops raise there, PyTorch's portable path runs ~10x
    # slower than fp32. The run must finish (no oneDNN call of ours) and say so in one line.
    import actrain.runtime
    from actrain import cli

    monkeypatch.setattr(actrain.runtime, "cpu_runs_bf16", lambda: False)
    common = ["--dataset", "digits", "--width", "16", "--epochs", "1", "--steps", "2"]
    common += ["--train-subset", "256", "--test-subset", "64", "--no-progress"]
    assert cli.main(["train", *common, "--precision", "bf16", "--out", str(tmp_path / "b")]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "no bf16 kernels" in ln]
    assert len(notes) == 1 and "10x slower than fp32" in notes[0]
    final = json.loads((tmp_path / "b" / "final.json").read_text())
    assert final["runtime"]["precision"] == "bf16"
    assert cli.main(["train", *common, "--precision", "fp32", "--out", str(tmp_path / "f")]) == 0
    assert "no bf16 kernels" not in capsys.readouterr().err


def test_channels_last_fp32_training_refuses_the_strided_1x1_convs_that_corrupt_memory_on_avx2(
    tmp_path, capsys, monkeypatch
):
    # torch 2.14.1 on an AVX2-only CPU: the fp32 channels_last weight gradient of a 1x1
    # stride-2 conv with 2-7 input channels aborts with "double free or corruption".
    import actrain.runtime as rt
    from actrain import cli
    from actrain.models import create_model

    monkeypatch.setattr(rt, "_cpu_capability", lambda: "AVX2")
    narrow = create_model("resnet18", width=4)
    assert rt.channels_last_fp32_hazard(narrow) == "layers.1.0.shortcut.0 (4 input channels)"
    assert rt.channels_last_fp32_hazard(create_model("resnet18", width=8)) is None
    assert rt.channels_last_fp32_hazard(narrow.requires_grad_(False)) is None
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--width", "4", "--precision", "fp32"]
    assert cli.main([*argv, "--channels-last", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "strided 1x1 conv layers.1.0.shortcut.0 (4 input channels)" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    monkeypatch.setattr(rt, "_cpu_capability", lambda: "AVX512")
    assert rt.channels_last_fp32_hazard(create_model("resnet18", width=4)) is None


def _torch_flags() -> tuple[bool, bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )


def _set_torch_flags(flags: tuple[bool, bool, bool]) -> None:
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.benchmark = flags[2]


@pytest.fixture
def torch_flags():
    """Whatever a test does, the next one starts from the settings this one found."""
    saved = _torch_flags()
    yield
    _set_torch_flags(saved)


def test_deterministic_training_gives_the_callers_torch_settings_back(tmp_path, torch_flags):
    # Trainer(deterministic=True) left torch.use_deterministic_algorithms(True) on after fit()
    _set_torch_flags((False, False, False))
    cfg = _cfg(tmp_path / "a", epochs=1, eval_every=0, train_subset=128, deterministic=True)
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    assert _torch_flags()[:2] == (True, True)  # the run trains under them
    trainer.fit()
    assert _torch_flags() == (False, False, False)
    # also when fit() fails half-way, and with the caller's own non-default settings
    _set_torch_flags((True, False, True))
    cfg = _cfg(tmp_path / "b", epochs=1, train_subset=128, deterministic=True)
    trainer = Trainer(cfg, prepare_run_dir(cfg, overwrite=False))
    assert _torch_flags() == (True, True, False)
    trainer.train_epoch = lambda epoch: 1 / 0
    with pytest.raises(ZeroDivisionError):
        trainer.fit()
    assert _torch_flags() == (True, False, True)


def test_run_training_leaves_the_callers_config_as_it_was(tmp_path, monkeypatch):
    # run_training wrote the resolved run folder and data folder back into the caller's config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = _cfg(tmp_path, epochs=1, eval_every=0, train_subset=128, data_dir="data", out=None)
    given = cfg.to_dict()
    run = run_training(cfg)
    assert cfg.to_dict() == given and cfg.out is None and cfg.data_dir == "data"
    saved = json.loads((run / "config.json").read_text())  # the run records them resolved
    assert saved["data_dir"] == str(tmp_path.resolve() / "data") and saved["out"] == str(run)
