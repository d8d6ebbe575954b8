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


def check_data_dir(data_dir: object, dataset: str | None = None, flag: str = "--data-dir") -> None:
    """Refuse a ``--data-dir`` that is missing or a file, before anything is loaded.

    A file went on to a download attempt and "[Errno 17] File exists"; a missing folder (a
    typo, most often) would receive a download. None: the default data folder, made when a
    download needs it."""
    if data_dir is None:
        return
    from pathlib import Path

    path = Path(str(data_dir)).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise DataError(f"{flag}: {data_dir} is a file, not a folder")
    downloads = dataset is None or get_dataset_info(dataset).name not in ("imagefolder", "digits")
    hint = " (create it to have the data set downloaded into it)" if downloads else ""
    raise DataError(f"{flag}: folder does not exist: {data_dir}{hint}")
