"""``actrain`` starts itself again with jemalloc preloaded where the system has it (issue 7)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actrain import malloc

ARGV = ["/usr/bin/python3", "-m", "actrain", "train", "--epochs", "1"]
LINUX = platform.system() == "Linux"


@pytest.mark.skipif(not LINUX, reason="preloading a malloc is done on Linux only")
def test_the_restart_preloads_jemalloc_with_its_memory_kept():
    argv, env = malloc.restart_command({"PATH": "/bin"}, ARGV, "libjemalloc.so.2")
    assert argv == ARGV and env["PATH"] == "/bin"
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"
    assert env["MALLOC_CONF"] == malloc.JEMALLOC_CONF
    # the restarted process does not restart again, even where the library failed to load
    assert malloc.restart_command(env, ARGV, "libjemalloc.so.2") is None


@pytest.mark.skipif(not LINUX, reason="preloading a malloc is done on Linux only")
def test_the_users_choices_stand():
    lib = "libjemalloc.so.2"
    assert malloc.restart_command({}, ARGV, None) is None  # none on this system
    assert malloc.restart_command({malloc.ENV: "system"}, ARGV, lib) is None
    assert malloc.restart_command({"LD_PRELOAD": "libfoo.so"}, ARGV, lib) is None
    assert malloc.restart_command({"MALLOC_CONF": "narenas:2"}, ARGV, lib)[1]["MALLOC_CONF"] == (
        "narenas:2"
    )
    _, env = malloc.restart_command({malloc.ENV: "/opt/libtcmalloc.so.4"}, ARGV, lib)
    assert env["LD_PRELOAD"] == "/opt/libtcmalloc.so.4" and "MALLOC_CONF" not in env


def _bench_malloc(env: dict[str, str]) -> tuple[int, str, str]:
    """``python -m actrain bench`` on a tiny model; its exit code, reported malloc, stderr."""
    args = ["--method", "natural", "--width", "4", "--batch-size", "8", "--iters", "1"]
    args += ["--warmup", "0", "--no-reference", "--no-flops", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "actrain", "bench", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    out = json.loads(proc.stdout)["env"]["malloc"] if proc.returncode == 0 else ""
    return proc.returncode, out, proc.stderr


@pytest.mark.skipif(not LINUX or not shutil.which("gcc"), reason="needs Linux and gcc")
def test_the_command_restarts_with_the_library_and_reports_it(tmp_path: Path):
    """End to end, with a stand-in library (an empty one named like jemalloc, so the test does
    not need jemalloc installed): the restarted process has it mapped and `actrain bench`
    names it; ``system`` keeps the C library's malloc; a missing path is one clear error."""
    src = tmp_path / "empty.c"
    src.write_text("int actrain_test_symbol;\n")
    lib = tmp_path / "libjemalloc.so.2"
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.ENV)}
    base.pop(malloc._TRIED, None)
    assert _bench_malloc({**base, malloc.ENV: str(lib)})[:2] == (0, "jemalloc")
    assert _bench_malloc({**base, malloc.ENV: "system"})[:2] == (0, "system")
    rc, _, err = _bench_malloc({**base, malloc.ENV: str(tmp_path / "nope.so")})
    assert rc == 2 and err.strip().count("\n") == 0 and "ACTRAIN_MALLOC" in err
    # auto: jemalloc where the system has it, the C library's malloc elsewhere
    want = "jemalloc" if malloc.find_jemalloc() else "system"
    assert _bench_malloc(base)[:2] == (0, want)


@pytest.mark.skipif(not LINUX, reason="peak RSS is read from /proc on Linux")
def test_peak_memory_counts_a_region_again_under_the_malloc_in_use():
    """`actrain bench` measures each row's peak RSS above what the process held at its reset.
    jemalloc (as actrain runs it, keeping freed memory) would hold on to the first row's pages,
    and every later row would report 0 MiB; the reset hands them back under either malloc."""
    code = (
        "import torch\nfrom actrain.bench import PeakMemory\nm = PeakMemory(torch.device('cpu'))\n"
        "for _ in range(2):\n    m.reset(); a = torch.ones(64 * 2**20); del a\n"
        "print(m.peak_mb()[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    lib = malloc.find_jemalloc()
    if lib:
        env.update(LD_PRELOAD=lib, MALLOC_CONF=malloc.JEMALLOC_CONF)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert 200 < float(out.stdout.split()[-1]) < 400  # the 256 MiB tensor of the second region
