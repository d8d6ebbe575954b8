"""Static description of the supported data sets, so callers can size models before loading."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from actrain.data.errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a data set before loading it."""

    name: str
    num_classes: int | None  # None: taken from the class folders at load time
    in_channels: int
    image_size: int | None  # side of the (square) images the model sees
    augment: str  # "none", "crop_flip" or "imagenet"
    in_memory: bool  # True: one uint8 tensor on the device; False: DataLoader with workers


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, "none", True),
    "mnist": DatasetInfo("mnist", 10, 1, 28, "none", True),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, "none", True),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, "crop_flip", True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, "crop_flip", True),
    "imagefolder": DatasetInfo("imagefolder", None, 3, 224, "imagenet", False),
}
# The alias maps to the same DatasetInfo object, whose .name is the canonical name.
DATASETS["fmnist"] = DATASETS["fashion_mnist"]

ALIASES: dict[str, str] = {"fmnist": "fashion_mnist"}


def get_dataset_info(name: str) -> DatasetInfo:
    """Look up a data set by name (case, '-' and aliases tolerated) with a did-you-mean hint."""
    key = name.strip().lower().replace("-", "_")
    if key in DATASETS:
        return DATASETS[key]
    squashed = {k.replace("_", ""): k for k in DATASETS}
    if key.replace("_", "") in squashed:  # "CIFAR-100", "fashionmnist"
        return DATASETS[squashed[key.replace("_", "")]]
    close = difflib.get_close_matches(key, list(DATASETS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    known = ", ".join(sorted(k for k in DATASETS if k not in ALIASES))
    raise DataError(f"unknown dataset '{name}' (known: {known}){hint}")
