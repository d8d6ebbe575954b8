"""The fast training path computes what the plain path computes; the benchmark reports it.

No timing is asserted anywhere: these tests check results (identical in fp32, within bf16
tolerance otherwise) and the benchmark's output format.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import pytest
import torch

from actrain import bench, runtime
from actrain.attacks import LinfBall, pgd
from actrain.cli import main
from actrain.fused import fused_bn_active
from actrain.losses import act_attack_objective
from actrain.models import create_model
from actrain.runtime import AttackView, attack_model, keep_freed_memory

TINY = {"arch": "resnet18", "width": 4, "batch_size": 8, "steps": 2, "device": "cpu"}


def _pair(method: str, **kw):
    """A synthetic-data Trainer and a plain reference starting from the same weights."""
    spec = bench.BenchSpec(method=method, **{**TINY, **kw})
    cfg = spec.train_config()
    torch.manual_seed(0)
    trainer = bench.synthetic_trainer(cfg)
    ref = bench.PlainReference(cfg, in_channels=3, num_classes=10)
    ref.load_from(trainer.models)
    x, y = next(bench.endless_batches(trainer.data.train))
    return trainer, ref, x, y


def _params(models) -> dict[str, torch.Tensor]:
    return {
        f"{r}.{k}": v.detach().clone() for r, m in models.items() for k, v in m.state_dict().items()
    }


@pytest.mark.parametrize("method", ["act", "madry", "trades", "natural"])
def test_fp32_trainer_step_is_identical_to_the_plain_step(method):
    # NCHW and no folding: the fp32 default except on AVX2-only x86 CPUs (next test)
    trainer, ref, x, y = _pair(method, precision="fp32", channels_last=False, fold_bn=False)
    assert trainer.precision == "fp32" and not trainer.channels_last
    assert not bench.fold_active(trainer)
    assert not any(fused_bn_active(m) for m in trainer.models.values())
    torch.manual_seed(1)
    out = trainer.train_step(x, y)
    torch.manual_seed(1)
    ref_losses = ref.step(x.contiguous(), y)
    for role, loss in ref_losses.items():
        assert torch.equal(out["losses"][role].detach(), loss), role
    mine, theirs = _params(trainer.models), _params(ref.models)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def _step_like_the_reference(trainer, ref, x, y, rtol: float, atol: float, cosine: float):
    """One step of each from the same weights: the losses agree within rtol/atol, and each
    model's update (gradient step incl. momentum and weight decay) points the same way."""
    before = _params(trainer.models)
    torch.manual_seed(1)
    out = trainer.train_step(x, y)
    torch.manual_seed(1)
    ref_losses = ref.step(x.contiguous(), y)
    for role, loss in ref_losses.items():
        assert torch.allclose(out["losses"][role].detach(), loss, rtol=rtol, atol=atol), role
    mine, theirs = _params(trainer.models), _params(ref.models)
    for role in ref_losses:
        keys = [k for k in mine if k.startswith(f"{role}.") and "running" not in k]
        keys = [k for k in keys if mine[k].is_floating_point()]
        moved = torch.cat([(mine[k] - before[k]).flatten() for k in keys])
        ref_moved = torch.cat([(theirs[k] - before[k]).flatten() for k in keys])
        assert torch.cosine_similarity(moved, ref_moved, dim=0) > cosine, role


def test_fp32_takes_channels_last_and_folding_by_default_only_on_avx2_x86_cpus(monkeypatch):
    # There both pay in fp32 (benchmarks/README.md); AVX-512 CPUs train in bf16 by default,
    # and an fp32 run there keeps the plain path.
    monkeypatch.setattr(runtime, "_cpu_capability", lambda: "AVX2")
    trainer, ref, x, y = _pair("act", precision="fp32", width=8)
    assert trainer.channels_last and bench.fold_active(trainer)
    assert trainer.runtime()["fold_bn"]
    # The same step up to float rounding (which may flip PGD's sign on a pixel or two)
    _step_like_the_reference(trainer, ref, x, y, rtol=1e-3, atol=1e-4, cosine=0.999)
    # A model with the strided 1x1 conv PyTorch mishandles there stays NCHW (still folded)
    narrow, *_ = _pair("act", precision="fp32", width=4)
    assert not narrow.channels_last and bench.fold_active(narrow)
    off, *_ = _pair("act", precision="fp32", width=8, fold_bn=False)
    assert off.channels_last and not bench.fold_active(off)
    assert not off.runtime()["fold_bn"]
    monkeypatch.setattr(runtime, "_cpu_capability", lambda: "AVX512")
    avx512, *_ = _pair("act", precision="fp32", width=8)
    assert not avx512.channels_last and not bench.fold_active(avx512)


@pytest.mark.parametrize("method", ["act", "madry"])
def test_bf16_fast_step_matches_the_plain_step_within_tolerance(method):
    # width 16: every BN layer has a multiple of 16 channels, so all take the fused kernels
    trainer, ref, x, y = _pair(method, precision="bf16", width=16)
    assert trainer.channels_last and bench.fold_active(trainer)
    assert all(fused_bn_active(m) for m in trainer.models.values())
    # bf16 rounding and the bf16 attack's slightly different x_adv move the update a little
    _step_like_the_reference(trainer, ref, x, y, rtol=0.05, atol=0.02, cosine=0.75)


def test_fp16_step_scales_the_loss_and_matches_the_plain_step():
    """fp16 (a GPU option; CPUs run it too) takes a GradScaler: gradients scaled for the
    backward, unscaled before the optimiser steps, so the update is the plain step's."""
    trainer, ref, x, y = _pair("act", precision="fp16", width=16)
    assert trainer.scaler is not None and trainer.channels_last
    before = _params(trainer.models)
    torch.manual_seed(1)
    out = trainer.train_step(x, y)
    torch.manual_seed(1)
    ref_losses = ref.step(x.contiguous(), y)
    assert trainer.scaler.get_scale() == 2.0**16  # no overflow: the initial scale is kept
    mine, theirs = _params(trainer.models), _params(ref.models)
    for role, loss in ref_losses.items():
        assert torch.allclose(out["losses"][role].detach(), loss, rtol=0.01, atol=0.01), role
        keys = [k for k in mine if k.startswith(f"{role}.") and "running" not in k]
        keys = [k for k in keys if mine[k].is_floating_point()]
        moved = torch.cat([(mine[k] - before[k]).flatten() for k in keys])
        ref_moved = torch.cat([(theirs[k] - before[k]).flatten() for k in keys])
        assert torch.cosine_similarity(moved, ref_moved, dim=0) > 0.9, role
        assert 0.8 < float(moved.norm() / ref_moved.norm()) < 1.25, role  # unscaled


def _trained_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", width=4, num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_attack_view_folds_bn_exactly_and_leaves_the_model_alone():
    model = _trained_bn_model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    view = AttackView(model)
    assert len(view.pairs) == 20  # every conv of ResNet-18 is followed by its BN
    x = torch.rand(6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = view.module.eval()(x)
    model.train()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training
    # Shared tensors follow the model; folded ones follow it after refresh().
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    view.refresh()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(view.module.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    assert attack_model(model, fold_bn=False) is model
    assert attack_model(model, fold_bn=True) is attack_model(model, fold_bn=True)


def test_attack_view_folds_the_synchronised_batch_norm_of_torchrun_runs():
    # torchrun --sync-bn converts every BN to SyncBatchNorm, an eval-mode affine map like any
    # BN; it was left unfolded, so 2 processes attacked another function than 1 (issue 5)
    # (torch's on CUDA, actrain's portable one on CPUs)
    from actrain.distributed import convert_sync_batchnorm

    x = torch.rand(6, 3, 32, 32)
    for device in ("cpu", "cuda"):
        synced = convert_sync_batchnorm(_trained_bn_model(), torch.device(device))
        view = AttackView(synced)
        assert len(view.pairs) == 20
        with torch.no_grad():
            torch.testing.assert_close(
                view.module.eval()(x), synced.eval()(x), rtol=1e-4, atol=1e-5
            )


class _SharedConvNet(torch.nn.Module):
    """One conv called twice (weight sharing), only its first call followed by a batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.bn(self.conv(x)))
        x = self.conv(x)  # the same module again, no batch norm after it
        return self.head(x.mean((2, 3)))


def test_attack_view_leaves_a_shared_conv_unfolded():
    torch.manual_seed(0)
    model = _SharedConvNet()
    with torch.no_grad():
        for bn in (model.bn, model.stem_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    view = AttackView(model)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        want = model.eval()(x)
        got = view.module.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert view.pairs == [("stem", "stem_bn")]  # the shared conv's pair is left as it is


def test_pgd_on_the_folded_view_finds_the_same_attack_in_fp32():
    model = _trained_bn_model()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ref = torch.randn(16, 10)
    objective = lambda lg: act_attack_objective(lg, ref, y, 0.9)  # noqa: E731
    threat = LinfBall(8 / 255, 2 / 255)
    torch.manual_seed(3)
    plain = pgd(model, x, objective, threat, 5, "gaussian")
    torch.manual_seed(3)
    folded = pgd(attack_model(model, fold_bn=True), x, objective, threat, 5, "gaussian")
    assert ((plain - folded).abs() < 1e-6).float().mean() > 0.99
    with torch.no_grad():
        model.eval()
        assert abs(float(objective(model(folded))) - float(objective(model(plain)))) < 1e-2


def test_bench_json_has_the_reported_keys(capsys):
    argv = ["bench", "--width", "2", "--batch-size", "4", "--steps", "1", "--iters", "1"]
    assert main([*argv, "--warmup", "0", "--reference-iters", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("images_per_s", "ms_per_step", "breakdown_ms", "peak_mem_mb", "overhead_ratio"):
        assert key in result
    assert set(result["breakdown_ms"]) == {"attack", "g_update", "f_update", "data", "other"}
    assert result["images_per_s"] > 0 and result["speedup_vs_reference"] > 0
    assert result["method"] == "act" and result["steps"] == 1
    assert result["model_gflop_per_step"] > 0 and result["matmul_tflops"] > 0
    assert result["model_tflops"] == pytest.approx(
        result["model_gflop_per_step"] / result["ms_per_step"], rel=0.01
    )


def _flops(method: str, steps: int, batch: int) -> float:
    cfg = bench.BenchSpec(method=method, **{**TINY, "steps": steps}).train_config()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return bench.model_flops_per_step(cfg, x, y)


def test_step_flops_count_one_attack_pass_per_pgd_step_and_scale_with_the_batch():
    act = [_flops("act", k, 8) for k in (1, 2, 3)]
    attack_pass = act[1] - act[0]
    assert attack_pass > 0 and act[2] - act[1] == pytest.approx(attack_pass)
    # ACT's step beyond its attack is one forward/backward of G and one of F; Madry's of G only
    madry = _flops("madry", 1, 8)
    natural = _flops("natural", 1, 8)
    assert act[0] - madry == pytest.approx(natural)
    assert madry - natural == pytest.approx(attack_pass)
    # An attack pass (forward + input gradient) costs about two forwards, a training pass
    # (forward + input and weight gradients) about three
    assert 1.3 < natural / attack_pass < 1.6
    assert 2 * _flops("act", 1, 4) == pytest.approx(act[0])  # counted on 2 images, scaled


def test_bench_rejects_bad_flags(capsys):
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["bench", "--method", "nope"]) == 2


def test_bench_eval_times_both_gradient_sources_on_the_same_attack(capsys):
    argv = ["bench", "--eval", "--width", "4", "--batch-size", "8", "--steps", "3"]
    assert main([*argv, "--iters", "2", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "eval" and r["steps"] == 3 and r["batch_size"] == 8
    assert r["images_per_s"] > 0 and r["images_per_s_plain_gradients"] > 0
    assert r["speedup"] == pytest.approx(r["images_per_s"] / r["images_per_s_plain_gradients"])
    ms = r["ms_per_batch"]
    assert r["images_per_s"] == pytest.approx(8000 / ms["folded"])
    assert "folded" in r["default_gradients"]  # the CPU default
    assert r["env"]["device"] == "cpu"  # under the training rows' key (it was "environment")
    # the same attack either way: at most one image of 8 apart (rounding of the path)
    assert abs(r["robust_acc"]["folded"] - r["robust_acc"]["plain"]) <= 12.5
    assert main([*argv, "--all"]) == 2
    assert main([*argv, "--precision", "fp16"]) == 2
    assert "fp32" in capsys.readouterr().err


def test_bench_all_writes_a_markdown_row_per_configuration(tmp_path, capsys):
    out = tmp_path / "table.md"
    argv = [
        "bench",
        "--all",
        "--widths",
        "2",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--precision",
        "fp32",
    ]
    assert (
        main([*argv, "--iters", "1", "--warmup", "0", "--reference-iters", "1", "--out", str(out)])
        == 0
    )
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 5  # header, four methods and the plain-levers ACT row
    assert "Plain fp32 NCHW reference ACT step, width 2" in table
    printed = capsys.readouterr()
    assert table in printed.out
    # vs Madry comes from the four methods' steps timed round-robin in one process
    assert "interleaved, resnet18 w2: act " in printed.err
    assert "Model resnet18, cifar10-shaped data, batch 4, training attack PGD (K=1)." in table
    assert "vs Madry, width 2: act " in table and "vs Madry, width 2: natural " in table
    madry_row = next(r for r in rows if r.startswith("| madry "))
    assert madry_row.rstrip(" |").endswith("1.00x")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--out", "x.md"], "--out: only with --all"),
        (["--widths", "8"], "--widths: only with --all"),
        (["--all", "--width", "8"], "--width: --all runs every method at --widths"),
        (["--all", "--method", "madry"], "--method: --all runs every method"),
        (["--arch", "wideresnet", "--width", "64"], "--width: wideresnet has a fixed size"),
        (["--all", "--arch", "wrn-28-10", "--widths", "8"], "--widths: wrn-28-10 has a fixed"),
        (["--eval", "--fold-bn", "off"], "--fold-bn: not used by --eval"),
        (["--eval", "--compile"], "--compile: not used by --eval"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16: a GPU option"),
    ],
)
def test_bench_refuses_flags_it_would_ignore(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_all_keeps_an_existing_table_unless_told(tmp_path, capsys, monkeypatch):
    out = tmp_path / "keep.md"
    out.write_text("IMPORTANT")
    monkeypatch.setattr(bench, "run_all", lambda *a, **k: pytest.fail("ran the matrix"))
    assert main(["bench", "--all", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "IMPORTANT"


def _fake_matrix(monkeypatch) -> list[bench.BenchSpec]:
    """run_all with each timing replaced by a record of what it would have timed."""
    timed: list[bench.BenchSpec] = []

    def run_bench(spec: bench.BenchSpec) -> dict:
        timed.append(spec)
        cfg = spec.train_config()
        row = {"method": spec.method, "arch": spec.arch, "width": cfg.width, "precision": "bf16"}
        return {**row, "ms_per_step": 10.0, "reference_ms_per_step": 30.0}

    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.setattr(bench, "format_line", lambda r: "")
    monkeypatch.setattr(bench, "interleaved_step_ms", lambda specs, rounds: [1.0, 1.0])
    return timed


def test_the_matrix_halves_the_timed_steps_only_at_full_width(monkeypatch):
    timed = _fake_matrix(monkeypatch)
    base = bench.BenchSpec(iters=6, warmup=2)
    bench.run_all(base, (64, 16), log=lambda line: None)
    iters = {(s.width, s.method, s.precision): s.iters for s in timed}
    assert iters[(64, "act", "auto")] == 3 and iters[(16, "act", "auto")] == 6  # it carried on


def test_the_matrix_of_a_fixed_size_model_or_a_fast_attack(monkeypatch):
    timed = _fake_matrix(monkeypatch)
    rows = bench.run_all(bench.BenchSpec(arch="wrn-28-10", width=None), (None,), log=print)
    assert [r["method"] for r in rows] == ["act", "madry", "trades", "natural"]
    assert all(r["width"] is None and r["vs_madry"] == 1.0 for r in rows)
    timed.clear()
    fgsm = bench.BenchSpec(train_attack="fgsm-rs")
    rows = bench.run_all(fgsm, (8,), log=lambda line: None)
    assert "natural" not in {s.method for s in timed}  # natural training has no attack
    assert all(r["reference_method"] == "act" for r in rows)


def test_folded_weights_stored_in_bf16_give_the_per_pass_cast_bit_for_bit():
    """Autocast re-casts fp32 tensors that need no gradient in every pass; the view stores
    them rounded once, which must not change a single attack step."""
    model = _trained_bn_model()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ref = torch.randn(16, 10)
    objective = lambda lg: act_attack_objective(lg, ref, y, 0.9)  # noqa: E731
    threat = LinfBall(8 / 255, 2 / 255)
    views = {dt: AttackView(model, dt).module.eval() for dt in (None, torch.bfloat16)}
    conv = next(m for m in views[torch.bfloat16].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == conv.bias.dtype == torch.bfloat16
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    found = {}
    for dt, view in views.items():
        torch.manual_seed(5)
        found[dt] = pgd(view, x, objective, threat, 3, "gaussian", autocast=bf16)
    assert torch.equal(found[None], found[torch.bfloat16])
    assert attack_model(model, fold_bn=True, precision="bf16").conv1.weight.dtype == torch.bfloat16


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
def test_consecutive_cpu_steps_do_not_page_fault_their_activations_in_again():
    """runtime.keep_freed_memory: without it each of these fp32 steps took 18,000-39,000 page
    faults (glibc handed the freed activations back to the kernel), with it none or a few."""
    spec = bench.BenchSpec(method="act", width=8, batch_size=128, steps=2, precision="fp32")
    trainer = bench.synthetic_trainer(spec.train_config())
    assert keep_freed_memory()  # applied by the Trainer, process-wide
    batches = bench.endless_batches(trainer.data.train)
    for _ in range(2):
        trainer.train_step(*next(batches))
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        trainer.train_step(*next(batches))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sorted(faults)[1] < 5000, faults


def test_cuda_graphs_on_a_cpu_is_one_clear_error_and_leaves_no_run_folder(tmp_path, capsys):
    assert main(["bench", "--cuda-graphs", "on", "--device", "cpu", "--width", "2"]) == 2
    assert "--cuda-graphs: needs a CUDA device" in capsys.readouterr().err
    config = Path(__file__).resolve().parents[1] / "configs/quickstart/digits_act.yaml"
    argv = ["train", "--config", str(config), "--device", "cpu"]
    out = tmp_path / "new"
    assert main([*argv, "--cuda-graphs", "--out", str(out)]) == 2
    assert "--cuda-graphs" in capsys.readouterr().err
    assert not out.exists()  # the folder made for the run is removed again
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main([*argv, "--cuda-graphs", "--out", str(mine)]) == 2
    assert mine.is_dir()  # a folder the user made stays


def test_model_streams_without_the_update_graph_is_one_clear_error(tmp_path, capsys):
    assert main(["bench", "--model-streams", "on", "--device", "cpu", "--width", "2"]) == 2
    err = capsys.readouterr().err
    assert "--model-streams: needs the update graph" in err and "not a CUDA device" in err
    config = Path(__file__).resolve().parents[1] / "configs/quickstart/digits_act.yaml"
    out = tmp_path / "new"
    argv = ["train", "--config", str(config), "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--model-streams"]) == 2
    assert "--model-streams" in capsys.readouterr().err and not out.exists()
    # off, or left to its default, trains as before on a CPU
    assert main([*argv, "--no-model-streams", "--epochs", "1", "--train-subset", "200"]) == 0
    assert json.loads((out / "config.json").read_text())["model_streams"] is False
    assert (out / "final.json").exists() and (out / "model_f.safetensors").exists()


def test_a_failed_graph_capture_falls_back_to_the_eager_update(capsys):
    """Where capture fails (here: a CPU has no CUDA streams), the step is the eager step and
    the run goes on without graphs, saying so once."""
    from actrain.step_graph import GraphedUpdate

    graphed, _, x, y = _pair("act", precision="fp32")
    eager, _, _, _ = _pair("act", precision="fp32")
    graphed.graphed_update = GraphedUpdate(graphed)
    for step in range(2):
        torch.manual_seed(step)
        a = graphed.train_step(x, y)
        torch.manual_seed(step)
        b = eager.train_step(x, y)
        for role in ("g", "f"):
            assert torch.equal(a["losses"][role], b["losses"][role]), role
    assert graphed.graphed_update is None
    assert capsys.readouterr().err.count("CUDA graph capture failed") == 1
    mine, theirs = _params(graphed.models), _params(eager.models)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def _steps_side_by_side(graphed, eager, x, y, steps: int = 3):
    """``steps`` training steps of both trainers from the same seeds, as (graphed's output,
    eager's output); after each, graphed's gradients are set to None, as a benchmark's own
    passes do, which a graphed update must survive."""
    for step in range(steps):
        torch.manual_seed(step)
        a = graphed.train_step(x, y)
        torch.manual_seed(step)
        yield a, eager.train_step(x, y)
        for model in graphed.models.values():
            model.zero_grad(set_to_none=True)


def _cpu_stand_in_for_cuda_graphs(params):
    """``step_graph.capture`` for a CPU: the function runs (as capture's warm-up and capture
    would), and each replay runs it again and writes its results into the captured outputs
    and gradient tensors, which is what replaying a CUDA graph does."""

    def capture(run, device, before=None):
        for _ in range(2):
            run()
        if before is not None:
            before()
        out, total = run()
        grads = [(p, p.grad) for p in params]

        class Replay:
            @staticmethod
            def replay():
                held = [p.grad for p in params]  # a replay leaves .grad references alone
                for p in params:
                    p.grad = None
                new, new_total = run()
                with torch.no_grad():
                    for (p, g), h in zip(grads, held, strict=True):
                        g.copy_(p.grad)
                        p.grad = h
                    for mine, theirs in ((out.losses, new.losses), (out.logits, new.logits)):
                        for r in mine:
                            mine[r].copy_(theirs[r])
                    total.copy_(new_total)

        return Replay(), (out, total)

    return capture


@pytest.mark.parametrize("method", ["act", "trades"])
def test_graphed_attack_flow_follows_each_replays_context(method, monkeypatch):
    """GraphedPGD with the CUDA graph replaced by re-running the captured function, as a
    replay re-runs the captured kernels: the attack of each step equals the eager attack, with
    that step's context (ACT: F(x)) copied into the graph's inputs. (An objective that computed
    from the context when built, outside the captured function, would keep the capture's
    context: seen on an H200 with a version of ACT's objective that did.)"""
    from actrain.attacks import graphed as graphed_module
    from actrain.attacks.graphed import GraphedPGD
    from actrain.runtime import attack_model

    def capture(run, device, before=None):
        for _ in range(2):
            run()
        out = run()

        class Replay:
            @staticmethod
            def replay():
                out.copy_(run())

        return Replay(), out

    monkeypatch.setattr(graphed_module, "capture", capture)
    trainer, _, x, y = _pair(method, precision="fp32")
    replay = GraphedPGD(trainer.train_attack)
    for step in range(3):  # each step's update changes F (the context) and G
        with torch.no_grad():
            ctx = trainer.method.prepare(trainer.models, x, y)
        g = attack_model(trainer.models["g"], trainer.fold_bn, trainer.precision)
        torch.manual_seed(step)
        mine = replay(g, x, y, ctx, trainer._attack_objective, trainer.autocast)
        torch.manual_seed(step)
        objective = trainer._attack_objective(ctx, y)
        eager = trainer.train_attack.perturb(g, x, objective, trainer.autocast)
        assert torch.equal(mine, eager), step
        trainer.train_step(x, y)
    assert replay.captures == 1


@pytest.mark.parametrize("method", ["act", "madry", "trades", "natural"])
def test_graphed_update_flow_gives_the_eager_update(method, monkeypatch):
    """The update graph's bookkeeping, with the CUDA graph itself replaced by re-running the
    captured function: random start drawn as the eager attack draws it, batch-norm statistics
    untouched by the capture's warm-up passes, gradients handed back after every replay (also
    when something set them to None in between). In fp32 the weights come out bit-identical."""
    from actrain import step_graph

    graphed, _, x, y = _pair(method, precision="fp32")
    eager, _, _, _ = _pair(method, precision="fp32")
    params = [p for m in graphed.models.values() for p in m.parameters()]
    monkeypatch.setattr(step_graph, "capture", _cpu_stand_in_for_cuda_graphs(params))
    graphed.graphed_update = step_graph.GraphedUpdate(graphed)
    for a, b in _steps_side_by_side(graphed, eager, x, y):
        for role in b["losses"]:
            assert torch.equal(a["losses"][role], b["losses"][role].detach()), role
    assert graphed.graphed_update.captures == 1
    mine, theirs = _params(graphed.models), _params(eager.models)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
