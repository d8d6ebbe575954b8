"""Shared fixtures: paths to the offline data and tiny trained runs reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ACTRAIN_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR10_JPEG = SHARED_DATA / "cifar10-jpeg"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    if not CIFAR10_JPEG.is_dir():
        raise pytest.UsageError(
            f"the offline data is missing: expected {CIFAR10_JPEG} (set ACTRAIN_SHARED_DATA)"
        )


@pytest.fixture(scope="session")
def cifar_dir() -> str:
    return str(CIFAR10_JPEG)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA
