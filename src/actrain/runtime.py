"""Device and numeric precision choices, resolved once per run."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        from actrain.config import ConfigError

        raise ConfigError(f"--device: unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from actrain.config import ConfigError

        raise ConfigError("--device: CUDA was requested but no GPU is available (use --device cpu)")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 autocast pays on the CPU."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory so hot loops can open the same autocast context cheaply."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
