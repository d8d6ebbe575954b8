"""The CUDA paths: the same checks as on the CPU, run where a GPU is present.

CI has no GPU, so these are skipped there; `benchmarks/gpu_check.py` runs them on a lent GPU
(benchmarks/README.md has the results).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_bench import _pair, _params, _steps_side_by_side
from test_train import DIGITS

from actrain import bench, load_model
from actrain.attacks.graphed import GraphedPGD
from actrain.config import build_config
from actrain.data import load_split
from actrain.evaluate import robust_accuracy
from actrain.runtime import attack_model
from actrain.train import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _moved(before, after, role):
    keys = [k for k in after if k.startswith(f"{role}.") and "running" not in k]
    keys = [k for k in keys if after[k].is_floating_point()]
    return torch.cat([(after[k] - before[k]).flatten().float() for k in keys])


@pytest.mark.parametrize("method", ["act", "madry", "trades", "natural"])
def test_cuda_fp32_trainer_step_matches_the_plain_step(method):
    trainer, ref, x, y = _pair(method, precision="fp32", device="cuda")
    assert trainer.device.type == "cuda" and x.is_cuda
    torch.manual_seed(1)
    out = trainer.train_step(x, y)
    torch.manual_seed(1)
    ref_losses = ref.step(x.contiguous(), y)
    for role, loss in ref_losses.items():
        assert torch.allclose(out["losses"][role].detach(), loss, rtol=1e-4, atol=1e-5), role
    mine, theirs = _params(trainer.models), _params(ref.models)
    for k in mine:
        assert torch.allclose(mine[k].float(), theirs[k].float(), rtol=1e-3, atol=1e-5), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_fast_step_matches_the_plain_step_within_tolerance(precision):
    trainer, ref, x, y = _pair("act", precision=precision, width=16, device="cuda")
    assert trainer.channels_last and bench.fold_active(trainer)
    assert (trainer.scaler is not None) == (precision == "fp16")
    before = _params(trainer.models)
    torch.manual_seed(1)
    out = trainer.train_step(x, y)
    torch.manual_seed(1)
    ref_losses = ref.step(x.contiguous(), y)
    mine, theirs = _params(trainer.models), _params(ref.models)
    for role, loss in ref_losses.items():
        assert torch.allclose(out["losses"][role].detach(), loss, rtol=0.05, atol=0.02), role
        moved, ref_moved = _moved(before, mine, role), _moved(before, theirs, role)
        assert torch.cosine_similarity(moved, ref_moved, dim=0) > 0.75, role
        assert 0.7 < float(moved.norm() / ref_moved.norm()) < 1.4, role


def test_cuda_step_matches_the_cpu_step_in_fp32():
    """Same weights, same batch, same random start: the GPU computes the CPU's step (TF32
    convolutions and cuDNN's summation order aside)."""
    cpu, _, x, y = _pair("act", precision="fp32", device="cpu")
    gpu, _, _, _ = _pair("act", precision="fp32", device="cuda")
    for role, model in gpu.models.items():
        model.load_state_dict(cpu.models[role].state_dict())
    torch.manual_seed(1)
    out_cpu = cpu.train_step(x.cpu(), y.cpu())
    torch.manual_seed(1)
    out_gpu = gpu.train_step(x.cuda(), y.cuda())
    for role in ("g", "f"):
        a, b = out_cpu["losses"][role].detach(), out_gpu["losses"][role].detach().cpu()
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), role


def test_cuda_digits_run_trains_evaluates_and_reloads(tmp_path):
    """A whole run on the GPU with the defaults a user gets there (precision auto = bf16)."""
    values = {**DIGITS, "method": "act", "epochs": 6, "device": "cuda", "precision": "auto"}
    run = run_training(build_config({}, {**values, "out": str(tmp_path / "r")}))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss_g"] < 0.7 * metrics[0]["loss_g"]
    assert metrics[-1]["test_clean_acc_g"] > 60.0
    model = load_model(run)
    test = load_split("digits", "test")
    x = test.images.float() / 255
    on_gpu = robust_accuracy(model.cuda(), x.cuda(), test.labels.cuda(), eps=0.1, steps=10)
    on_cpu = robust_accuracy(model.cpu(), x, test.labels, eps=0.1, steps=10)
    assert on_gpu["clean_acc"] == pytest.approx(on_cpu["clean_acc"], abs=0.5)
    assert on_gpu["robust_acc"] == pytest.approx(on_cpu["robust_acc"], abs=2.0)


def _attack_both_ways(trainer, replay, x, y, seed=3):
    """The trainer's attack replayed from a CUDA graph, and the eager attack, from the same
    random start."""
    models = trainer.models
    with trainer.autocast(), torch.no_grad():
        ctx = trainer.method.prepare(models, x, y)
    g = attack_model(models["g"], trainer.fold_bn, trainer.precision)
    torch.manual_seed(seed)
    graphed = replay(g, x, y, ctx, trainer._attack_objective, trainer.autocast)
    torch.manual_seed(seed)
    eager = trainer.train_attack.perturb(g, x, trainer._attack_objective(ctx, y), trainer.autocast)
    return graphed, eager


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphed_attack_finds_the_eager_attack_and_follows_the_weights(precision):
    trainer, _, x, y = _pair("act", precision=precision, width=8, device="cuda")
    replay = GraphedPGD(trainer.train_attack)
    for _ in range(3):  # the graph reads the weights each step's update changed
        graphed, eager = _attack_both_ways(trainer, replay, x, y)
        assert graphed.shape == x.shape and not torch.equal(graphed, x)
        assert (graphed - x).abs().max() <= trainer.cfg.eps + 1e-6
        same = (graphed == eager).float().mean().item()
        assert same > 0.99, same
        trainer.train_step(x, y)
    assert replay.captures == 1
    graphed, eager = _attack_both_ways(trainer, replay, x[:5], y[:5])  # a last, smaller batch
    assert replay.captures == 2 and graphed.shape == (5, *x.shape[1:])
    assert (graphed == eager).float().mean().item() > 0.99


def test_cuda_step_with_graphs_matches_the_step_without():
    with_graphs, _, x, y = _pair("act", precision="bf16", width=16, device="cuda")
    without, _, _, _ = _pair("act", precision="bf16", width=16, device="cuda", cuda_graphs=False)
    without.models["g"].load_state_dict(with_graphs.models["g"].state_dict())
    without.models["f"].load_state_dict(with_graphs.models["f"].state_dict())
    assert with_graphs.graphed_update is not None and without.graphed_update is None
    for _ in range(3):
        torch.manual_seed(1)
        a = with_graphs.train_step(x, y)["losses"]
        torch.manual_seed(1)
        b = without.train_step(x, y)["losses"]
        for role in ("g", "f"):
            assert torch.allclose(a[role].detach(), b[role].detach(), rtol=0.02, atol=0.01)


def _twins(method: str, precision: str, **kw):
    """Two trainers with the same weights: the update replayed from a CUDA graph, and eager."""
    graphed, _, x, y = _pair(method, precision=precision, device="cuda", **kw)
    kw.pop("model_streams", None)  # needs the update graph
    eager, _, _, _ = _pair(method, precision=precision, device="cuda", cuda_graphs=False, **kw)
    for role, model in eager.models.items():
        model.load_state_dict(graphed.models[role].state_dict())
    assert graphed.graphed_update is not None
    assert eager.graphed_update is None and eager.graphed_attack is None
    return graphed, eager, x, y


@pytest.fixture
def deterministic_cuda():
    """--deterministic sets process-wide flags; put them back for the tests that follow."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


@pytest.mark.parametrize(
    "method,streams",
    [("act", True), ("act", False), ("madry", None), ("trades", None), ("natural", None)],
)
def test_cuda_graphed_update_is_the_eager_update(method, streams, deterministic_cuda):
    # --deterministic: the same cuDNN algorithms in both (with its autotuner, run-to-run
    # rounding, amplified by the attack's signs, moved the logits by up to 0.4 on an H200)
    extra = {"deterministic": True}
    graphed, eager, x, y = _twins(method, "fp32", width=8, model_streams=streams, extra=extra)
    # ACT's F on its own stream by default (--model-streams); one-model methods have none
    assert (graphed.graphed_update.side is not None) == (method == "act" and streams is not False)
    before = _params(eager.models)
    for a, b in _steps_side_by_side(graphed, eager, x, y):
        for role in b["losses"]:
            la, lb = a["losses"][role], b["losses"][role]
            assert torch.allclose(la, lb, rtol=1e-4, atol=1e-5), (role, float(la), float(lb))
            off = float((a["logits"][role] - b["logits"][role]).detach().abs().max())
            assert off < 1e-3, (role, off)
    assert graphed.graphed_update.captures == 1
    mine, theirs = _params(graphed.models), _params(eager.models)
    for role in eager.models:
        moved, ref_moved = _moved(before, mine, role), _moved(before, theirs, role)
        assert torch.cosine_similarity(moved, ref_moved, dim=0) > 0.999, role
    # batch-norm statistics saw each batch once: the capture's two warm-up passes do not count
    # (had they counted, the statistics would have moved about twice as far from their start)
    start = {k: torch.ones_like(v) if "var" in k else torch.zeros_like(v) for k, v in mine.items()}
    keys = [k for k in mine if "running_" in k]
    off = torch.cat([(mine[k] - theirs[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(theirs[k] - start[k]).flatten() for k in keys]).norm()
    assert off < 0.01 * moved, (float(off), float(moved))


def test_cuda_graphed_update_in_bf16_and_a_smaller_last_batch():
    graphed, eager, x, y = _twins("act", "bf16", width=16)
    for n in (len(y), len(y), 5, len(y)):
        torch.manual_seed(n)
        a = graphed.train_step(x[:n], y[:n])
        torch.manual_seed(n)
        b = eager.train_step(x[:n], y[:n])
        for role in ("g", "f"):
            assert torch.allclose(a["losses"][role], b["losses"][role], rtol=0.02, atol=0.01)
    assert graphed.graphed_update.captures == 2  # the full batch and the smaller one


def test_cuda_evaluation_with_folded_gradients_matches_the_model():
    """The folded gradient copy on a GPU (the default there since it measured 1.57x faster):
    the same robust accuracy as the model's own gradients within rounding, every verdict from
    the model."""
    from actrain.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=16).cuda().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x, y = torch.rand(200, 3, 32, 32), torch.randint(0, 10, (200,))
    kw = dict(eps=2 / 255, step_size=0.5 / 255, steps=10, restarts=1, seed=0)
    plain = robust_accuracy(model, x, y, fold_bn=False, **kw)
    fold = robust_accuracy(model, x, y, **kw)
    assert plain["attack"]["gradients"] == "model" and "folded" in fold["attack"]["gradients"]
    assert fold["clean_acc"] == plain["clean_acc"]
    assert abs(fold["robust_acc"] - plain["robust_acc"]) <= 2.0  # 4 of 200 examples
    broken = fold["clean_mask"] & ~fold["robust_mask"]
    with torch.no_grad():
        pred = model(fold["x_adv"][broken].cuda()).argmax(1).cpu()
    assert (pred != y[broken]).all()
