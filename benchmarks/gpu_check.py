"""The device check for a lent GPU, as one script (the lease is short: run it once, read after).

    OUT=gpu-out PYTHONPATH=src python3 benchmarks/gpu_check.py

Runs, each part under its own time limit and each result written as soon as it exists:
the CUDA tests (tests/test_cuda.py), ACT with and without --model-streams against Madry, the
levers one at a time on a full-width ACT step, the paper's larger models and torch.compile
(LEVERS_UNTIL_S=0 skips them), the benchmark matrix (`actrain bench --all --device cuda`),
then fp32 PGD evaluation with and without the BN-folded gradient model. Results go to $OUT:
tests.txt, streams.jsonl, levers.jsonl, results-gpu.md, eval.jsonl, log.txt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "gpu-out"))
START = time.time()


def log(text: str) -> None:
    line = f"[{time.time() - START:6.1f}s] {text}"
    print(line, flush=True)
    with open(OUT / "log.txt", "a") as f:
        f.write(line + "\n")


def run(cmd: list[str], limit: int, out: str, env: dict[str, str] | None = None) -> None:
    log(f"$ {' '.join(cmd)}")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
        text = done.stdout + done.stderr
        log(f"exit {done.returncode}")
    except subprocess.TimeoutExpired as exc:
        text = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMED OUT after {limit} s"
        log(f"timed out after {limit} s")
    except OSError as exc:  # a missing program (nvidia-smi in a dry run)
        text = f"{exc}"
        log(text)
    (OUT / out).write_text(text if isinstance(text, str) else text.decode())
    print(text[-3000:], flush=True)


def levers(budget_s: float) -> None:
    """Full-width ACT at batch 128, K = 10: each lever on its own, in one process."""
    from actrain import bench

    base = bench.BenchSpec(device="cuda", width=64, iters=20, warmup=3, reference_iters=5)
    if os.environ.get("DRY_RUN"):  # the script's own check on a CPU: tiny and quick
        base = bench.BenchSpec(
            device="cpu", width=4, batch_size=4, steps=1, iters=1, warmup=0, reference_iters=1
        )
    variants = [
        ("default (auto)", {}),
        ("no CUDA graphs", {"cuda_graphs": False}),
        ("no model streams", {"model_streams": False}),
        ("fp32 NCHW no fold (TF32 convs)", {"precision": "fp32", "channels_last": False}),
        ("fp16 + GradScaler (attack graph only)", {"precision": "fp16"}),
        ("madry default", {"method": "madry"}),
        ("madry, no CUDA graphs", {"method": "madry", "cuda_graphs": False}),
        ("batch 512", {"batch_size": 512, "iters": 10}),
        ("wrn-28-10 batch 128", {"arch": "wrn-28-10", "width": None, "iters": 5}),
        (
            "resnet50 imagenet batch 64 K=2",
            {
                "arch": "resnet50",
                "width": None,
                "dataset": "imagefolder",
                "batch_size": 64,
                "steps": 2,
                "iters": 5,
                "reference_iters": 2,
            },
        ),
        # last, as it compiles for a minute: Triton's fused BN + ReLU inside the step graph
        ("compile + step graph", {"compile": True, "iters": 10}),
    ]
    wanted = os.environ.get("LEVERS")  # a comma-separated subset of the labels' first words
    if wanted:
        keep = {w.strip() for w in wanted.split(",")}
        variants = [(label, c) for label, c in variants if label.split()[0] in keep]
    for label, change in variants:
        if time.time() - START > budget_s:
            log(f"skipped (time): {label}")
            continue
        spec = bench.BenchSpec(**{**asdict(base), **change})
        if os.environ.get("DRY_RUN"):
            small = {"iters": 1, "batch_size": min(spec.batch_size, 4), "steps": 1}
            spec = bench.BenchSpec(**{**asdict(spec), **small, "reference_iters": 1})
        spec.reference = label == "default (auto)"
        try:
            row = bench.run_bench(spec)
        except Exception as exc:  # one lever failing must not cost the others
            log(f"{label}: FAILED {type(exc).__name__}: {exc}")
            continue
        row["label"] = label
        log(f"{label}: {bench.format_line(row)}")
        with open(OUT / "levers.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def streams() -> None:
    """ACT with F on its own CUDA stream (--model-streams, the default) and without, against
    Madry, timed in interleaved rounds in one process, for three model sizes."""
    from actrain import bench

    sizes = [("resnet18", 64, 20), ("resnet18", 16, 20), ("wrn-28-10", None, 6)]
    for arch, width, rounds in sizes:
        base = bench.BenchSpec(device="cuda", arch=arch, width=width, flops=False)
        if os.environ.get("DRY_RUN"):
            base = bench.BenchSpec(device="cpu", width=4, batch_size=4, steps=1)
            rounds = 1
        on = os.environ.get("DRY_RUN") is None or None  # None: a CPU has no streams
        specs = [
            bench.BenchSpec(**{**asdict(base), "model_streams": on}),
            bench.BenchSpec(**{**asdict(base), "model_streams": False}),
            bench.BenchSpec(**{**asdict(base), "method": "madry"}),
        ]
        act_on, act_off, madry = bench.interleaved_step_ms(specs, rounds)
        row = {"arch": arch, "width": width, "rounds": rounds, "act_streams_ms": act_on}
        row |= {"act_one_stream_ms": act_off, "madry_ms": madry}
        row |= {"ratio_streams": act_on / madry, "ratio_one_stream": act_off / madry}
        log(f"streams: {json.dumps(row)}")
        with open(OUT / "streams.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def evaluation() -> None:
    """fp32 PGD-20 on a full-width ResNet-18, gradients from the model vs from its BN-folded
    channels_last copy (`actrain bench --eval`; `--fold-bn` stays off by default on a GPU
    until this says otherwise)."""
    from actrain import bench

    spec = bench.BenchSpec(device="cuda", width=64, batch_size=512, steps=20, iters=3)
    if os.environ.get("DRY_RUN"):
        spec = bench.BenchSpec(device="cpu", width=4, batch_size=8, steps=2, iters=1)
    for precision in ("fp32", "bf16"):  # bf16: the gradients only, verdicts stay fp32
        row = bench.run_eval_bench(bench.BenchSpec(**{**asdict(spec), "precision": precision}))
        log(bench.format_eval_line(row))
        with open(OUT / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    empty = Path("/tmp/actrain-no-shared-data")
    (empty / "cifar10-jpeg").mkdir(parents=True, exist_ok=True)  # conftest asks for the dir
    env.setdefault("ACTRAIN_SHARED_DATA", str(empty))
    run(["nvidia-smi"], 20, "env.txt")
    import torch

    cudnn = torch.backends.cudnn.version()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    log(f"torch {torch.__version__}, {name}, cudnn {cudnn}")
    run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_cuda.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
        ],
        int(os.environ.get("TESTS_S", "150")),
        "tests.txt",
        env,
    )
    sys.path.insert(0, str(ROOT / "src"))
    for part in (streams,):  # each must not cost the rest
        try:
            part()
        except Exception as exc:
            log(f"{part.__name__}: FAILED {type(exc).__name__}: {exc}")
    levers(float(os.environ.get("LEVERS_UNTIL_S", "300")))
    left = float(os.environ.get("TOTAL_S", "420")) - (time.time() - START)
    matrix = ["bench", "--all", "--device", "cuda", "--iters", "20", "--warmup", "3"]
    matrix += ["--reference-iters", "5", "--out", str(OUT / "results-gpu.md")]
    if os.environ.get("DRY_RUN"):
        matrix = ["bench", "--all", "--device", "cpu", "--widths", "4", "--batch-size", "4"]
        matrix += ["--steps", "1", "--iters", "1", "--reference-iters", "1"]
        matrix += ["--out", str(OUT / "results-gpu.md")]
    run([sys.executable, "-m", "actrain", *matrix], int(max(10, left)), "bench-all.txt", env)
    try:
        evaluation()
    except Exception as exc:
        log(f"evaluation: FAILED {type(exc).__name__}: {exc}")
    log("done")


if __name__ == "__main__":
    main()
