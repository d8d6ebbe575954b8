"""``actrain report`` and ``actrain sweep`` on tiny real runs on sklearn's digits."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actrain.analysis.analyze import analyze_run
from actrain.cli import main
from actrain.config import build_config
from actrain.evaluate import evaluate_run, write_json
from actrain.report import fmt_ms, mean_std
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
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and does not slow down on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Madry with seeds 0 and 1 (each with a real PGD eval JSON), ACT seed 0; all analysed."""
    root = tmp_path_factory.mktemp("report-runs")
    out = {}
    for name, method, seed in (
        ("madry-s0", "madry", 0),
        ("madry-s1", "madry", 1),
        ("act", "act", 0),
    ):
        cfg = build_config({}, {**TINY, "method": method, "seed": seed, "out": str(root / name)})
        out[name] = run_training(cfg)
    for name in ("madry-s0", "madry-s1"):
        res = evaluate_run(
            str(out[name]),
            steps=3,
            restarts=1,
            eps=0.1,
            step_size=0.05,
            test_subset=60,
            device="cpu",
            progress=False,
        )
        write_json(res, str(out[name] / "eval" / "pgd3.json"))
    for path in out.values():
        analyze_run(path, max_samples=100, probe_epochs=2, command=f"actrain analyze {path}")
    return out


def last_eval(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "test_clean_acc_g" in r][-1]


def row_of(md: str, table_header_start: str, first_cells: str) -> list[str]:
    """Cells of the first row starting with ``first_cells`` in the table after a header line."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(table_header_start))
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if line.startswith(first_cells):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {first_cells!r} in table {table_header_start!r}")


def test_mean_std_is_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1, 2, 4])))
    assert fmt_ms([80.0, 82.0]) == "81.00 ± 1.41"
    assert fmt_ms([80.0]) == "80.00"
    assert fmt_ms([]) == "–"


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc = main(["report", *(str(p) for p in runs.values()), "--out", str(out)])
    assert rc == 0
    return out


def test_report_files_and_images(report):
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 5  # norms, probe curves, entropy bars, 2 training-curve figures
    for name in images:
        assert (report / name).read_bytes()[:8] == PNG_MAGIC
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == len(images)
    assert all(base64.b64decode(b)[:8] == PNG_MAGIC for b in embedded)
    assert 'src="' not in html.replace('src="data:image/png;base64,', "")  # self-contained

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.tables = [], 0

        def handle_starttag(self, tag, attrs):
            if tag not in ("img", "meta", "br"):
                self.stack.append(tag)
            self.tables += tag == "table"

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    checker = Check()
    checker.feed(html)
    separators = [line for line in md.splitlines() if line.startswith("|---")]
    assert checker.stack == [] and checker.tables == len(separators) == 6


def test_report_tables_hold_metrics_mean_and_std(runs, report):
    md = (report / "report.md").read_text()
    m0, m1 = last_eval(runs["madry-s0"]), last_eval(runs["madry-s1"])
    row = row_of(
        md,
        "| Architecture | Dataset | Defense | A_nat | A_rob PGD-2",
        "| small_cnn | digits | Madry |",
    )
    nat = [m0["test_clean_acc_g"], m1["test_clean_acc_g"]]
    rob = [m0["test_pgd2_acc_g"], m1["test_pgd2_acc_g"]]
    expected_nat = f"{statistics.fmean(nat):.2f} ± {statistics.stdev(nat):.2f}"
    expected_rob = f"{statistics.fmean(rob):.2f} ± {statistics.stdev(rob):.2f}"
    assert row[3:6] == [expected_nat, expected_rob, "2"]
    act = last_eval(runs["act"])
    row_f = row_of(
        md,
        "| Architecture | Dataset | Defense | A_nat | A_rob PGD-2",
        "| small_cnn | digits | ACT (F) |",
    )
    assert row_f[3:5] == [f"{act['test_clean_acc_f']:.2f}", f"{act['test_pgd2_acc_f']:.2f}"]
    assert "actrain train --arch small_cnn" in md and "--seed 1" in md  # commands listed
    tables = json.loads((report / "report.json").read_text())["tables"]
    assert tables["table2_metrics"]["rows"][0][3] == expected_nat
    assert act["eval_images"] == 100 and "on 100 test images" in md  # --eval-size 100


def test_report_names_the_images_a_run_evaluated_on(tmp_path):
    # --eval-size 500 on digits' 360 test images: the report once said 500
    from actrain.analysis.runs import Run
    from actrain.report import _metrics_protocol

    cfg = {"eps": 0.1, "step_size": 0.05, "eval_size": 500}
    recorded = Run(tmp_path, cfg, metrics=[{"eval_images": 360}, {"epoch": 2}])
    assert "on 360 test images" in _metrics_protocol([recorded])
    older = Run(tmp_path, cfg, metrics=[{"epoch": 1}])  # before runs recorded the count
    assert "on up to 500 test images" in _metrics_protocol([older])
    assert "on all validation images" in _metrics_protocol([Run(tmp_path, {"val_size": 50})])


def test_report_eval_table_from_eval_json(runs, report):
    md = (report / "report.md").read_text()
    evals = [
        json.loads((runs[n] / "eval" / "pgd3.json").read_text()) for n in ("madry-s0", "madry-s1")
    ]
    row = row_of(
        md,
        "| Architecture | Dataset | Defense | A_nat | A_rob PGD-3",
        "| small_cnn | digits | Madry |",
    )
    assert row[3] == fmt_ms([e["clean_acc"] for e in evals])
    assert row[4] == fmt_ms([e["robust_acc"] for e in evals])
    assert "## Evaluation (Table 2 layout)" in md and "## During-training evaluation" in md
    assert f"actrain eval {runs['madry-s0']} --steps 3 --restarts 1" in md


def test_report_analyses_from_analysis_json(runs, report):
    md = (report / "report.md").read_text()
    act = json.loads((runs["act"] / "analysis" / "analysis.json").read_text())
    for role in ("g", "f"):
        ent = act["models"][role]["entropy"]
        row = row_of(md, "| Dataset | Model | Mean entropy", f"| digits | ACT ({role.upper()})")
        assert row[2] == f"{ent:.4f}"
        probe = row_of(md, "| Model | Final acc.", f"| ACT ({role.upper()})")
        assert probe[1] == f"{act['models'][role]['probe']['final_acc']:.2f}"
    ms = [
        json.loads((runs[n] / "analysis" / "analysis.json").read_text())
        for n in ("madry-s0", "madry-s1")
    ]
    classifier = [m["models"]["g"]["norms"][-1]["norm"] for m in ms]
    row = row_of(md, "| # | Layer |", "| 4 | classifier |")
    assert row[2] == fmt_ms(classifier, 3)
    for heading in (
        "Model complexity (Fig. 3 left)",
        "Information compression (Fig. 3 right)",
        "Posterior entropy (Fig. 4)",
        "Training curves",
    ):
        assert f"## {heading}" in md


def test_report_reads_suite_style_eval_json(runs, tmp_path):
    """The layout of `actrain eval --suite paper` and of a transfer matrix, nested results."""
    run = tmp_path / "act-copy"
    shutil.copytree(runs["act"], run)
    pgd = {"attack": {"norm": "Linf", "eps": 0.1, "restarts": 5, "loss": "ce"}, "n": 50}
    suite = {
        "run": str(run),
        "model": "g",
        "n": 50,
        "pgd": {
            "20": {
                **pgd,
                "clean_acc": 91.0,
                "robust_acc": 60.0,
                "attack": {**pgd["attack"], "name": "PGD-20", "steps": 20},
            },
            "100": {
                **pgd,
                "clean_acc": 91.0,
                "robust_acc": 58.5,
                "attack": {**pgd["attack"], "name": "PGD-100", "steps": 100},
            },
        },
        "clean_acc": 91.0,
        "robust_acc": 60.0,
        "robust_acc_attack": "PGD-20x5",
        "min_perturbation": {
            "fgsm-k": {"mean": 0.0812, "n_correct": 45},
            "pgd-search": {"mean": 0.0655},
        },
        "eps_sweep": {
            "rows": [
                {"eps_255": 1, "eps": 1 / 255, "robust_acc": 88.0},
                {"eps_255": 5, "eps": 5 / 255, "robust_acc": 70.0},
            ]
        },
        "black_box": {"square": {"robust_acc": 75.0, "n": 50}},
        "sanity": {
            "passed": True,
            "checks": [
                {
                    "name": "white-box beats black-box",
                    "status": "pass",
                    "passed": True,
                    "detail": "60.00% vs 75.00%",
                },
                {
                    "name": "AutoAttack <= PGD",
                    "status": "skipped",
                    "passed": None,
                    "detail": "needs AutoAttack",
                },
            ],
        },
        "settings": {"eps_sweep": [1, 5], "sanity": True},
        "indices": list(range(50)),
    }
    f_result = {
        "run": str(run),
        "model": "f",
        "clean_acc": 95.0,
        "robust_acc": 40.0,
        "n": 50,
        "attack": {"name": "PGD-20", "steps": 20, "restarts": 5, "eps": 0.1},
    }
    matrix = {
        "surrogates": [str(runs["madry-s0"]), str(run)],
        "targets": [str(run)],
        "success_rate": {str(run): {str(runs["madry-s0"]): 12.5, str(run): 30.0}},
        "n": 50,
    }
    (run / "eval").mkdir(exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(run / "eval" / "examples.png")
    suite["examples_png"] = "examples.png"  # Fig. 2 grid of --save-examples, beside the JSON
    (run / "eval" / "suite.json").write_text(json.dumps(suite))
    (run / "eval" / "f.json").write_text(json.dumps(f_result))
    (run / "eval" / "transfer.json").write_text(json.dumps(matrix))
    out = tmp_path / "rep"
    assert main(["report", str(run), str(runs["madry-s0"]), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    header = (
        "| Architecture | Dataset | Defense | A_nat | A_rob PGD-3 | A_rob PGD-20 | A_rob PGD-100 "
        "| A_rob Square | Min. perturbation (fgsm-k) | Min. perturbation (pgd-search)"
    )
    row = row_of(md, header, "| small_cnn | digits | ACT (G) |")
    assert row[3:10] == ["91.00", "–", "60.00", "58.50", "75.00", "0.08120", "0.06550"]
    row_f = row_of(md, header, "| small_cnn | digits | ACT (F) |")
    assert row_f[3:7] == ["95.00", "–", "40.00", "–"]
    assert row_of(md, "| Defense | 1/255 | 5/255", "| ACT") == ["ACT", "88.00", "70.00"]
    assert row_of(md, "| Def \\ Sur | Madry | ACT", "| ACT") == ["ACT", "12.50", "30.00"]
    assert (
        "| ACT (seed 0, act-copy) | G | white-box beats black-box | pass | 60.00% vs 75.00% |" in md
    )
    assert "| AutoAttack <= PGD | skipped |" in md
    assert "## Minimal adversarial examples (Fig. 2)" in md
    assert (out / "examples-ACT_digits_small_cnn-s0-g.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_runs_one_per_value_and_report_tabulates_it(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "".join(f"{k}: {v}\n" for k, v in {**TINY, "method": "act", "epochs": 1}.items())
    )
    out = tmp_path / "sweep"
    argv = ["sweep", "--param", "alpha", "0.3", "0.7", "--config", str(cfg), "--out", str(out)]
    assert main([*argv, "--jobs", "2"]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["param"] == "alpha" and doc["values"] == ["0.3", "0.7"]
    assert [r["status"] for r in doc["runs"]] == ["finished", "finished"]
    for v in ("0.3", "0.7"):
        config = json.loads((out / f"alpha-{v}" / "config.json").read_text())
        assert config["alpha"] == float(v) and config["method"] == "act" and config["epochs"] == 1
    assert main([*argv, "--jobs", "1"]) == 0  # again: finished runs are skipped
    assert "already finished" in capsys.readouterr().out
    # one more value into the same folder adds to the sweep (it once dropped 0.3 and 0.7)
    more = ["sweep", "--param", "alpha", "0.5", "--config", str(cfg), "--out", str(out)]
    assert main(more) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["values"] == ["0.3", "0.7", "0.5"]
    assert [r["status"] for r in doc["runs"]] == ["finished"] * 3
    other = ["sweep", "--param", "seed", "1", "--config", str(cfg), "--out", str(out)]
    assert main(other) == 2  # another parameter would not make one table with these
    assert "holds a sweep of alpha" in capsys.readouterr().err

    rep = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert "## Parameter sweeps (Table 1 layout)" in md
    assert "actrain sweep --param alpha 0.5" in md
    for v in ("0.3", "0.7", "0.5"):
        m = last_eval(out / f"alpha-{v}")
        row = row_of(
            md, "| alpha | G A_nat | G A_rob (PGD-2) | F A_nat | F A_rob (PGD-2)", f"| {v} |"
        )
        assert row[1:5] == [
            f"{m[k]:.2f}"
            for k in ("test_clean_acc_g", "test_pgd2_acc_g", "test_clean_acc_f", "test_pgd2_acc_f")
        ]
    assert "actrain sweep --param alpha 0.3 0.7" in md
    assert (rep / "sweep-act-digits-small_cnn-alpha.png").is_file()


def test_sweep_rejects_mistakes_before_launching(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--param", "alpah", "0.1", "--out", str(out)]) == 2
    assert "did you mean 'alpha'" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--param",
                "alpha",
                "0.5",
                "1.5",
                "--set",
                "dataset=digits",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--alpha" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(
            [
                "sweep",
                "--param",
                "seed",
                "0",
                "1",
                "--set",
                "dataset=digits",
                "--set",
                "epochs=2",
                "--out",
                str(out),
                "--dry-run",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("--epochs 2" in x and "--dataset digits" in x for x in lines)
    assert lines[1].endswith(f"--seed 1 --out {out / 'seed-1'} --no-progress")
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2


def test_an_analysis_of_weights_trained_on_since_is_flagged_and_redone(tmp_path, capsys):
    # analysed mid-training, then resumed to the end: the report showed the old numbers
    from actrain.config import resume_config

    cfg = build_config({}, {**TINY, "method": "madry", "epochs": 2, "out": str(tmp_path / "r")})
    cfg.epochs = 1  # the first epoch of a 2-epoch schedule
    run = run_training(cfg)
    analyze_run(run, max_samples=100, probe_epochs=1)
    run_training(resume_config(run, {"epochs": 2}), resume=True)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "was analysed at epoch 1 and has trained to epoch 2 since" in md
    argv = ["report", str(run), "--out", str(tmp_path / "rep2"), "--analyze"]
    assert main([*argv, "--max-samples", "100", "--probe-epochs", "1"]) == 0
    assert json.loads((run / "analysis" / "analysis.json").read_text())["epoch"] == 2
    assert "Out of date" not in (tmp_path / "rep2" / "report.md").read_text()


def test_an_eval_file_of_another_run_is_left_out_and_said_so(runs, tmp_path):
    # a TRADES result put in a Madry run's eval/ showed as Madry's A_rob
    run = tmp_path / "madry"
    shutil.copytree(runs["madry-s0"], run)
    mine = json.loads(next((run / "eval").rglob("*.json")).read_text())
    other = {**mine, "method": "trades", "robust_acc": 1.0, "run": "runs/trades0"}
    (run / "eval" / "other.json").write_text(json.dumps(other))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"`{run / 'eval' / 'other.json'}` (an evaluation of a trades run, not of {run})" in md
    (run / "eval" / "cut.json").write_text('{"clean_acc": 9')  # unreadable: it vanished silently
    assert main(["report", str(run), "--out", str(tmp_path / "rep2")]) == 0
    md2 = (tmp_path / "rep2" / "report.md").read_text()
    assert f"`{run / 'eval' / 'cut.json'}` (unreadable: not a JSON object)" in md2
    row = row_of(md, "| Architecture | Dataset | Defense | A_nat | A_rob", "| small_cnn | digits |")
    assert f"{mine['robust_acc']:.2f}" in row and "1.00" not in row


def test_the_during_training_caption_names_each_runs_settings(tmp_path):
    # it gave the first run's eps and step for every row
    from actrain.analysis.runs import Run
    from actrain.report import _metrics_protocol

    a = Run(tmp_path / "madry", {"eps": 0.1, "step_size": 0.025}, metrics=[{"eval_images": 32}])
    b = Run(tmp_path / "trades", {"eps": 0.031, "step_size": 0.007}, metrics=[{"eval_images": 32}])
    text = _metrics_protocol([a, b])
    assert "eps 0.1, step 0.025, on 32 test images (madry)" in text
    assert "eps 0.031, step 0.007, on 32 test images (trades)" in text


def test_torchrun_runs_are_their_own_configuration_and_repeated_seeds_are_named(runs, tmp_path):
    # a 2-process run (twice the global batch) was averaged with one-process runs of its seed
    for name in ("a", "b", "ddp"):
        shutil.copytree(runs["madry-s0"], tmp_path / "r" / name)
    metrics = tmp_path / "r" / "ddp" / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "processes": 2}) + "\n" for r in recs))
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    groups = json.loads((tmp_path / "rep" / "report.json").read_text())["groups"]
    assert sorted(len(g["runs"]) for g in groups) == [1, 2]
    assert "**Repeated seeds:**" in md and "seed 0 2 times" in md
    assert "torchrun --nproc_per_node 2 -m actrain train" in md


def test_of_two_results_of_one_attack_the_more_complete_one_counts(runs, tmp_path):
    # two PGD results at one eps (16 images x 1 restart, then 60 x 2): the first file's won
    run = tmp_path / "madry"
    shutil.copytree(runs["madry-s0"], run)
    mine = json.loads(next((run / "eval").rglob("*.json")).read_text())
    small = {**mine, "n": 16, "robust_acc": 1.0, "attack": {**mine["attack"], "restarts": 1}}
    (run / "eval" / "a-small.json").write_text(json.dumps(small))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    row = row_of(md, "| Architecture | Dataset | Defense | A_nat | A_rob", "| small_cnn | digits |")
    assert f"{mine['robust_acc']:.2f}" in row and "1.00" not in row


def test_long_configuration_names_give_distinct_figure_files():
    # cut at 80 characters, lr=0.05 and lr=0.1 shared one training-curve file
    from types import SimpleNamespace

    from actrain.report import ReportBuilder

    base = "ACT · digits · small_cnn (alpha=0.9, batch_size=64, epochs=1, eps=0.1, eval_every=5, "
    slug = ReportBuilder.slug
    names = {slug(None, SimpleNamespace(label=base + f"lr={lr})")) for lr in (0.05, 0.1)}
    assert len(names) == 2 and all(len(n) <= 80 for n in names)
    assert slug(None, SimpleNamespace(label="ACT · digits")) == "ACT_digits"


def test_analysing_one_model_keeps_the_others_and_mixed_probes_are_flagged(runs, tmp_path):
    # `analyze --model f` dropped G's analysis; the caption gave one probe's settings for all
    run = tmp_path / "act"
    shutil.copytree(runs["act"], run)
    analyze_run(run, roles=["f"], max_samples=100, probe_epochs=3, command="analyze F")
    saved = json.loads((run / "analysis" / "analysis.json").read_text())["models"]
    assert list(saved) == ["g", "f"] and saved["f"]["probe"]["epochs"] == 3
    assert saved["g"]["probe"]["epochs"] == 2  # the fixture's analysis of G, kept
    # each model keeps the command and sample count behind its numbers
    assert saved["f"]["command"] == "analyze F" and saved["f"]["samples"] == 100
    assert saved["g"]["command"] == f"actrain analyze {runs['act']}"
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**Different probe settings on digits:**" in md
    assert "2 epochs, seed 0, 100 images (ACT (G))" in md and "3 epochs" in md


def test_of_two_equally_complete_results_the_report_takes_the_strongest(runs, tmp_path):
    # a second PGD-3 result with another step (e.g. the old default) sorted first by name and
    # was taken, whatever it measured
    import shutil

    from actrain.analysis.runs import load_run
    from actrain.report import eval_scores

    run = tmp_path / "madry"
    shutil.copytree(runs["madry-s0"], run)
    good = json.loads((run / "eval" / "pgd3.json").read_text())
    weak = {**good, "robust_acc": good["robust_acc"] + 10.0}
    weak["attack"] = {**good["attack"], "step_size": 0.0001}
    (run / "eval" / "a-weak.json").write_text(json.dumps(weak))
    assert eval_scores(load_run(run), "g")["PGD-3"] == good["robust_acc"]


def test_analysis_and_report_refuse_what_they_would_ignore_or_destroy(runs, tmp_path, capsys):
    run = runs["act"]
    before = (run / "analysis" / "analysis.json").read_text()
    argv = ["analyze", str(run), "--max-samples", "20", "--probe-epochs", "1"]
    assert main([*argv, "--out", str(run / "analysis")]) == 2
    assert "is the run's own analysis folder" in capsys.readouterr().err
    assert (run / "analysis" / "analysis.json").read_text() == before
    out = tmp_path / "r"
    assert main(["report", str(run), "--out", str(out), "--probe-epochs", "3"]) == 2
    assert "--probe-epochs: only with --analyze" in capsys.readouterr().err


def test_a_sweep_refuses_a_repeated_value_and_a_run_of_another_config(tmp_path, capsys):
    out = tmp_path / "sweep"
    base = ["sweep", "--set", "dataset=digits", "--out", str(out), "--dry-run"]
    assert main([*base, "--param", "alpha", "0.1", "0.10"]) == 2
    assert "0.1 and 0.10 are the same value" in capsys.readouterr().err
    (out / "alpha-0.1").mkdir(parents=True)  # trained before the config file was edited
    cfg = build_config({}, {"dataset": "digits", "alpha": 0.1, "epochs": 1})
    (out / "alpha-0.1" / "config.json").write_text(cfg.to_json())
    assert main([*base, "--param", "alpha", "0.1", "--set", "epochs=2"]) == 2
    assert "was trained with epochs 1 (now 2)" in capsys.readouterr().err


# ---- fake run folders: config, metrics, eval and analysis JSON written directly (no training) --
def fake_run(
    path: Path,
    *,
    method: str = "madry",
    seed: int = 0,
    evals: dict[str, dict] | None = None,
    analysis: dict | None = None,
    epochs: int = 2,
    **config,
) -> Path:
    """A run folder as `actrain train`/`eval`/`analyze` leave it, with made-up numbers."""
    cfg = {"method": method, "dataset": "digits", "arch": "small_cnn", "seed": seed}
    cfg.update({"eps": 0.1, "step_size": 0.05, **config})
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    recs = [
        {"epoch": e, "loss_g": 2.0 / e, "train_acc_g": 40.0 + e, "test_clean_acc_g": 50.0 + e}
        for e in range(1, epochs + 1)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name, obj in (evals or {}).items():
        (path / "eval").mkdir(exist_ok=True)
        (path / "eval" / name).write_text(json.dumps(obj))
    if analysis is not None:
        (path / "analysis").mkdir()
        (path / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    return path


def pgd_result(
    steps: int, robust: float, clean: float = 90.0, step_size: float = 0.003, n: int = 100
) -> dict:
    attack = {"name": f"PGD-{steps}", "steps": steps, "restarts": 1, "eps": 0.1}
    return {
        "clean_acc": clean,
        "robust_acc": robust,
        "n": n,
        "model": "g",
        "attack": {**attack, "step_size": step_size},
    }


def fake_analysis(entropy: float, samples: int, num_classes: int | None = None) -> dict:
    probe = {
        "final_acc": 60.0,
        "best_acc": 61.0,
        "curve": [55.0, 60.0],
        "chance_acc": 50.0,
        "n": samples,
        "hidden": [400, 200],
        "epochs": 2,
        "lr": 0.001,
        "batch_size": 128,
        "seed": 0,
        "standardize": False,
    }
    model = {
        "norms": [{"layer": "classifier", "kind": "linear", "norm": 3.0}],
        "entropy": entropy,
        "probe": probe,
        "samples": samples,
    }
    out = {"samples": samples, "models": {"g": model}}
    if num_classes is not None:
        out["num_classes"] = num_classes
    return out


def test_seeds_column_says_how_many_seeds_each_number_averages(tmp_path):
    # beta=1 has 3 seeds, only 2 with a PGD-20 result: Table 1 and 2 showed Seeds=3 beside it
    root = tmp_path / "runs"
    for seed, evals in (
        (0, {"pgd20.json": pgd_result(20, 40.0, clean=80.0)}),
        (1, {"pgd20.json": pgd_result(20, 44.0, clean=82.0)}),
        (2, {"pgd100.json": pgd_result(100, 39.0, clean=84.0)}),
    ):
        fake_run(root / f"b1-s{seed}", method="trades", seed=seed, beta=1.0, evals=evals)
    fake_run(
        root / "b6-s0",
        method="trades",
        beta=6.0,
        evals={"pgd20.json": pgd_result(20, 50.0, clean=70.0)},
    )
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    t1 = row_of(md, "| beta | G A_nat | G A_rob (PGD-20) | Seeds", "| 1 |")
    assert t1 == ["1", fmt_ms([80.0, 82.0, 84.0]), fmt_ms([40.0, 44.0]) + " [2/3]", "3"]
    assert row_of(md, "| beta | G A_nat", "| 6 |") == ["6", "70.00", "50.00", "1"]
    header = "| Architecture | Dataset | Defense | A_nat | A_rob PGD-20 | A_rob PGD-100 | Seeds"
    t2 = row_of(md, header, "| small_cnn | digits | TRADES (beta=1) |")
    assert t2[3:] == [
        fmt_ms([80.0, 82.0, 84.0]),
        fmt_ms([40.0, 44.0]) + " [2/3]",
        "39.00 [1/3]",
        "3",
    ]
    assert "[k/n]: the mean over the k of the row's n seeds" in md


def test_table2_says_where_seeds_were_attacked_on_different_numbers_of_images(tmp_path):
    # seed 0 on 100 test images, seed 1 on 1000: averaged as seeds, and nothing said so
    root = tmp_path / "runs"
    for seed, n in ((0, 100), (1, 1000)):
        evals = {"pgd20.json": pgd_result(20, 40.0 + seed, n=n)}
        fake_run(root / f"m-s{seed}", method="madry", seed=seed, evals=evals)
    for seed in (0, 1):  # TRADES's two seeds alike: not named
        evals = {"pgd20.json": pgd_result(20, 45.0, n=500)}
        fake_run(root / f"t-s{seed}", method="trades", seed=seed, evals=evals)
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    note = next(line for line in md.splitlines() if "Different numbers of test images" in line)
    assert "Madry PGD-20 (100, 1000 images)" in note
    assert "TRADES" not in note
    row = row_of(md, "| Architecture | Dataset | Defense", "| small_cnn | digits | Madry")
    assert row[-2:] == [fmt_ms([40.0, 41.0]), "2"]  # still one column, with the note beside it


def test_a_report_never_draws_over_a_file_it_did_not_write(tmp_path, capsys):
    # a person's picture named like a report figure, and a report.md of their own, were replaced
    a = fake_run(tmp_path / "madry", method="madry")
    out = tmp_path / "rep"
    out.mkdir()
    assert main(["report", str(a), "--out", str(tmp_path / "probe")]) == 0
    (name,) = json.loads((tmp_path / "probe" / "report.json").read_text())["figures"]
    theirs = PNG_MAGIC + b"a person's own picture"
    (out / name).write_bytes(theirs)
    (out / "report.md").write_text("my notes")
    assert main(["report", str(a), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report.md exists and no earlier report wrote it" in err
    assert (out / "report.md").read_text() == "my notes"
    (out / "report.md").unlink()
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert (out / name).read_bytes() == theirs  # kept; the report drew beside it
    drawn = json.loads((out / "report.json").read_text())["figures"]
    other = name[: -len(".png")] + ".2.png"
    assert drawn == [other] and (out / other).read_bytes()[:8] == PNG_MAGIC
    assert f"]({other})" in (out / "report.md").read_text()
    assert main(["report", str(a), "--out", str(out)]) == 0  # again: its own .2 file, redrawn
    assert json.loads((out / "report.json").read_text())["figures"] == [other]
    assert sorted(p.name for p in out.glob("*.png")) == sorted([name, other])
    assert (out / name).read_bytes() == theirs


def test_a_report_redone_with_fewer_runs_removes_its_own_stale_figures_only(tmp_path):
    # report.md and report.json were right, the PNGs of runs no longer reported stayed behind
    a = fake_run(tmp_path / "madry", method="madry")
    b = fake_run(tmp_path / "trades", method="trades")
    out = tmp_path / "rep"
    out.mkdir()
    mine = {"curves-mine.png": b"mine", "holiday.png": PNG_MAGIC + b"user", "notes.txt": b"n"}
    for name, data in mine.items():  # the user's files (one named like a report figure)
        (out / name).write_bytes(data)
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    first = json.loads((out / "report.json").read_text())["figures"]
    trades_png = next(f for f in first if f.startswith("curves-TRADES"))
    madry_png = next(f for f in first if f.startswith("curves-Madry"))
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert not (out / trades_png).exists()  # this report's own, no longer in it: removed
    assert (out / madry_png).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "report.json").read_text())["figures"] == [madry_png]
    for name, data in mine.items():
        assert (out / name).read_bytes() == data
    # a figure the user replaced after the report wrote it is the user's now: kept
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    (out / trades_png).write_bytes(PNG_MAGIC + b"edited by hand")
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert (out / trades_png).read_bytes() == PNG_MAGIC + b"edited by hand"
    # a figure that `actrain analyze --out` wrote into the same folder belongs to analysis.md
    (out / "analysis.json").write_text(json.dumps({"figures": ["entropy.png"]}))
    (out / "entropy.png").write_bytes(PNG_MAGIC)
    report = json.loads((out / "report.json").read_text())
    own = {"entropy.png": hashlib.sha256(PNG_MAGIC).hexdigest()}  # as if this report drew it
    (out / "report.json").write_text(json.dumps({**report, "figure_sha256": own}))
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert (out / "entropy.png").is_file()
    (out / "analysis.json").unlink()  # now it is this report's alone, unchanged: removed
    (out / "report.json").write_text(json.dumps({**report, "figure_sha256": own}))
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert not (out / "entropy.png").exists()


def test_entropy_rows_of_different_sample_counts_are_flagged(tmp_path):
    # compression rows said so, entropy rows averaged and compared them silently
    root = tmp_path / "runs"
    fake_run(root / "madry", method="madry", analysis=fake_analysis(0.5, 100))
    fake_run(root / "trades", method="trades", analysis=fake_analysis(0.7, 300))
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**Different analysis settings for the entropy on digits:**" in md
    assert row_of(md, "| Dataset | Model | Mean entropy", "| digits | Madry")[3] == "100"
    assert row_of(md, "| Dataset | Model | Mean entropy", "| digits | TRADES")[3] == "300"
    assert "100 training images (Madry); 300 training images (TRADES)" in md
    assert "**Different probe settings on digits:**" in md  # the compression flag, as before
    # one setting: no flag
    assert main(["report", str(root / "madry"), "--out", str(tmp_path / "rep2")]) == 0
    md2 = (tmp_path / "rep2" / "report.md").read_text()
    assert "Different analysis settings" not in md2 and "100 training images." in md2


def test_results_of_different_attack_settings_are_not_averaged_as_seeds(tmp_path):
    # seed 0 had PGD-20 only at step 0.003, seed 1 only at 0.007: one mean of two attacks
    root = tmp_path / "runs"
    fake_run(root / "s0", seed=0, evals={"p.json": pgd_result(20, 40.0, step_size=0.003)})
    fake_run(root / "s1", seed=1, evals={"p.json": pgd_result(20, 50.0, step_size=0.007)})
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    header = (
        "| Architecture | Dataset | Defense | A_nat | A_rob PGD-20 (step 0.003) "
        "| A_rob PGD-20 (step 0.007) | Seeds"
    )
    row = row_of(md, header, "| small_cnn | digits | Madry |")
    assert row[3:] == [fmt_ms([90.0, 90.0]), "40.00 [1/2]", "50.00 [1/2]", "2"]
    assert fmt_ms([40.0, 50.0]) not in md
    assert "**Different attack settings:** PGD-20 at step 0.003 (s0), at step 0.007 (s1)" in md
    # where each run has the strongest of its results at one setting, they are one column
    both = pgd_result(20, 45.0, step_size=0.007)
    (root / "s0" / "eval" / "q.json").write_text(json.dumps(both))  # weaker: 0.003 stays
    (root / "s1" / "eval" / "q.json").write_text(json.dumps(pgd_result(20, 42.0)))  # stronger
    assert main(["report", str(root), "--out", str(tmp_path / "rep2")]) == 0
    md2 = (tmp_path / "rep2" / "report.md").read_text()
    row = row_of(
        md2, "| Architecture | Dataset | Defense | A_nat | A_rob PGD-20 | Seeds", "| small"
    )
    assert row[4:] == [fmt_ms([40.0, 42.0]), "2"]
    assert "Different attack settings" not in md2


def test_the_entropy_reference_is_the_log_of_each_data_sets_own_class_count(tmp_path, monkeypatch):
    # two ImageFolder data sets of 3 and 5 classes shared one "imagefolder" log(C) line
    import actrain.analysis.plots as plots

    drawn = {}

    def record(bars, path, ylabel, title="", refs=None):
        drawn.update(bars=dict(bars), refs=dict(refs or {}))
        return plots._save(plots.plt.figure(), path)  # a real file: the HTML embeds it

    monkeypatch.setattr(plots, "plot_bars", record)
    root = tmp_path / "runs"
    for name, classes in (("birds", 3), ("cars", 5)):
        fake_run(
            root / name,
            dataset="imagefolder",
            data_dir=str(tmp_path / "data" / name),
            analysis=fake_analysis(0.5, 100, num_classes=classes),
        )
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    assert drawn["refs"] == {
        "imagefolder (birds)": pytest.approx(math.log(3)),
        "imagefolder (cars)": pytest.approx(math.log(5)),
    }
    assert sorted(drawn["bars"]) == ["imagefolder (birds)", "imagefolder (cars)"]
    md = (tmp_path / "rep" / "report.md").read_text()
    row = row_of(md, "| Dataset | Model | Mean entropy", "| imagefolder (cars) |")
    assert row[4] == f"{math.log(5):.4f}"
    # a data set of the registry needs no recorded class count: digits has 10
    fake_run(root / "digits", analysis=fake_analysis(0.5, 100))
    assert main(["report", str(root / "digits"), "--out", str(tmp_path / "rep2")]) == 0
    assert drawn["refs"] == {"digits": pytest.approx(math.log(10))}


def test_two_image_folders_get_their_own_norms_and_compression_plots(tmp_path):
    # Madry on the birds folder and on the cars folder shared one norms plot, one compression
    # plot and table ("imagefolder"), their series told apart only by `data_dir=/full/path`,
    # and the two data sets made a "sweep" over data_dir
    from actrain.report import OWN_FIGURE

    root = tmp_path / "runs"
    for name in ("birds", "cars"):
        fake_run(
            root / name,
            dataset="imagefolder",
            data_dir=str(tmp_path / "data" / name),
            analysis=fake_analysis(0.5, 100, num_classes=3),
        )
    fake_run(root / "digits", analysis=fake_analysis(0.5, 100))
    out = tmp_path / "rep"
    assert main(["report", str(root), "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    figures = doc["figures"]
    for name in ("birds", "cars"):
        assert f"norms-imagefolder-{name}-small_cnn.png" in figures
        assert f"compression-imagefolder-{name}.png" in figures
        norms = doc["tables"][f"norms_imagefolder-{name}_small_cnn"]
        assert norms["headers"] == ["#", "Layer", "Madry"]  # its own data set's series only
        assert [r[0] for r in doc["tables"][f"compression_imagefolder-{name}"]["rows"]] == ["Madry"]
    # a data set of the registry keeps its file names
    assert {"norms-digits-small_cnn.png", "compression-digits.png"} <= set(figures)
    assert len(figures) == len(set(figures)) and all(OWN_FIGURE.fullmatch(f) for f in figures)
    assert all((out / f).read_bytes()[:8] == PNG_MAGIC for f in figures)
    md = (out / "report.md").read_text()
    assert "Frobenius norms (small_cnn, imagefolder (birds))." in md
    assert "Random-label fitting accuracy (%) on imagefolder (cars)." in md
    # every table names the data set, not a folder path as a setting
    assert "Madry · imagefolder (birds) · small_cnn" in [g["label"] for g in doc["groups"]]
    header = "| Architecture | Dataset | Defense"
    assert row_of(md, header, "| small_cnn | imagefolder (cars) |")[2] == "Madry"
    assert "data_dir=" not in md and "Parameter sweeps" not in md


def test_image_folders_of_one_name_get_distinct_safe_figure_files(tmp_path):
    # two folders named "x": the data set's name is its path, which must not become a
    # subfolder of the report (or two paths one file name: /a/b-c/x and /a/b/c/x)
    from actrain.report import OWN_FIGURE, _data_slugs

    slugs = _data_slugs(["digits", "imagefolder (/a/b-c/x)", "imagefolder (/a/b/c/x)"])
    assert slugs["digits"] == "digits"
    assert len(set(slugs.values())) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9._=-]+", s) for s in slugs.values())
    root = tmp_path / "runs"
    for where in ("a", "b"):
        fake_run(
            root / where,
            dataset="imagefolder",
            data_dir=str(tmp_path / where / "x"),
            analysis=fake_analysis(0.5, 100, num_classes=3),
        )
    out = tmp_path / "rep"
    assert main(["report", str(root), "--out", str(out)]) == 0
    figures = json.loads((out / "report.json").read_text())["figures"]
    norms = [f for f in figures if f.startswith("norms-")]
    assert len(norms) == 2 and len(set(figures)) == len(figures)
    assert all(OWN_FIGURE.fullmatch(f) and (out / f).is_file() for f in figures)
    md = (out / "report.md").read_text()
    assert f"imagefolder ({tmp_path / 'a' / 'x'})" in md
    # the report's own figure names: redone with one folder, the other's plots are removed
    assert main(["report", str(root / "a"), "--out", str(out)]) == 0
    left = json.loads((out / "report.json").read_text())["figures"]
    assert len([f for f in left if f.startswith("norms-")]) == 1
    assert sorted(p.name for p in out.glob("*.png")) == sorted(left)
