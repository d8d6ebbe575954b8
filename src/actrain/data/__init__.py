"""Data loading for actrain: in-memory uint8 tensors for small sets, DataLoader for ImageFolder.

Every epoch's order and augmentation is a pure function of (seed, epoch), which makes resume
and distributed sharding exact.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Loaded on first use, so that checking a dataset name does not import torch.
_LAZY: dict[str, str] = {
    "AUGMENTATIONS": "actrain.data.augment",
    "augment_batch": "actrain.data.augment",
    "crop_flip": "actrain.data.augment",
    "sample_crop_flip_params": "actrain.data.augment",
    "ImageTensors": "actrain.data.datasets",
    "default_data_dir": "actrain.data.datasets",
    "list_image_folder": "actrain.data.datasets",
    "load_image_folder": "actrain.data.datasets",
    "load_split": "actrain.data.datasets",
    "train_val_split": "actrain.data.datasets",
    "DataError": "actrain.data.errors",
    "ImageFolderLoader": "actrain.data.loaders",
    "InMemoryLoader": "actrain.data.loaders",
    "build_loader": "actrain.data.loaders",
    "make_imagefolder_loaders": "actrain.data.loaders",
    "load_folder_split": "actrain.data.loaders",
    "decode_subset": "actrain.data.loaders",
    "DATASETS": "actrain.data.registry",
    "DatasetInfo": "actrain.data.registry",
    "get_dataset_info": "actrain.data.registry",
    "balanced_subset_indices": "actrain.data.sampling",
    "epoch_generator": "actrain.data.sampling",
    "epoch_positions": "actrain.data.sampling",
}

if TYPE_CHECKING:  # pragma: no cover
    from actrain.data.augment import (  # noqa: F401
        AUGMENTATIONS,
        augment_batch,
        crop_flip,
        sample_crop_flip_params,
    )
    from actrain.data.datasets import (  # noqa: F401
        ImageTensors,
        default_data_dir,
        list_image_folder,
        load_image_folder,
        load_split,
        train_val_split,
    )
    from actrain.data.errors import DataError  # noqa: F401
    from actrain.data.loaders import (  # noqa: F401
        ImageFolderLoader,
        InMemoryLoader,
        build_loader,
        decode_subset,
        load_folder_split,
        make_imagefolder_loaders,
    )
    from actrain.data.registry import DATASETS, DatasetInfo, get_dataset_info  # noqa: F401
    from actrain.data.sampling import balanced_subset_indices, epoch_generator, epoch_positions  # noqa: F401

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'actrain.data' has no attribute {name!r}")
