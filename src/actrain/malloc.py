"""jemalloc for the ``actrain`` command where the system has it (issue 7).

On this project's CPU a training step under jemalloc ran 9 % faster at ResNet-18 width 16 on
one thread (4-12 % on both cores) and 5 % at full width, with a lower peak RSS, than under
glibc's malloc (benchmarks/README.md): the attack passes' oneDNN convs and zero fills ran
faster (a cache of PyTorch's own tensor blocks alone did not do that). A process cannot
change its malloc once running, so ``actrain`` starts itself again with jemalloc preloaded
before it imports anything heavy. Torch-free on purpose: it runs before ``import torch``.

``ACTRAIN_MALLOC``: unset or ``auto`` (jemalloc where found), ``system`` (the C library's), or
the path of a malloc library to preload (tcmalloc, mimalloc, a jemalloc elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV = "ACTRAIN_MALLOC"
_TRIED = "_ACTRAIN_MALLOC_TRIED"  # set in the restarted process: never restart twice
# Freed memory stays with the process (as runtime.keep_freed_memory does for glibc): with
# jemalloc's default decay a width-16 ACT step ran 20 % slower, page-faulting its memory back.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc() -> str | None:
    """jemalloc's shared library in the system's library folders or a conda environment's (a
    few file checks: ``ctypes.util.find_library`` runs gcc where it finds nothing, 20 ms on
    every command)."""
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    folders = [f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/lib64", "/usr/lib"]
    folders += ["/usr/local/lib"]
    if os.environ.get("CONDA_PREFIX"):
        folders.insert(0, os.path.join(os.environ["CONDA_PREFIX"], "lib"))
    for folder in folders:
        for name in ("libjemalloc.so.2", "libjemalloc.so"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def restart_command(
    env: Mapping[str, str], argv: Sequence[str], jemalloc: str | None
) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment to start this process again with a malloc library
    preloaded, or None where it stays as it is: not Linux, ``ACTRAIN_MALLOC=system``, a
    library already preloaded (the user's choice), a restart already tried, or no library."""
    choice = env.get(ENV, "auto")
    if platform.system() != "Linux" or choice == "system" or env.get(_TRIED):
        return None
    if env.get("LD_PRELOAD"):
        return None
    lib = jemalloc if choice == "auto" else choice
    if not lib:
        return None
    new_env = dict(env)
    new_env["LD_PRELOAD"] = lib
    new_env[_TRIED] = "1"
    if "jemalloc" in Path(lib).name:
        new_env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return list(argv), new_env


def use_fast_malloc() -> None:
    """Start this ``actrain`` process again with jemalloc preloaded, if :func:`restart_command`
    says so (``os.execve``: same process id, same arguments, nothing run yet). A library path
    in ``ACTRAIN_MALLOC`` that does not exist is a usage error, reported by the caller."""
    choice = os.environ.get(ENV, "auto")
    if choice == "system":
        return
    if choice != "auto" and not Path(choice).is_file():
        raise FileNotFoundError(f"{ENV}={choice}: no such library (or use auto, system)")
    found = find_jemalloc() if choice == "auto" else None
    command = restart_command(os.environ, sys.orig_argv, found)
    if command is not None:
        argv, env = command
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)


def malloc_in_use() -> str:
    """The allocator behind this process's CPU tensors: a preloaded jemalloc, tcmalloc or
    mimalloc (found among the process's mapped libraries), else "system". CPU step times
    depend on it (jemalloc: attack passes ~9 % faster at width 16, benchmarks/README.md), so
    benchmarks and the run header name it."""
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text()
        for name in ("jemalloc", "tcmalloc", "mimalloc"):
            if f"lib{name}" in maps:
                return name
    return "system"
