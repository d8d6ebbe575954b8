"""Data loading for actrain: in-memory uint8 tensors for small sets, DataLoader for ImageFolder.

Every epoch's order and augmentation is a pure function of (seed, epoch), which makes resume
and distributed sharding exact.
"""

from actrain.data.augment import AUGMENTATIONS, augment_batch, crop_flip, sample_crop_flip_params
from actrain.data.datasets import (
    ImageTensors,
    default_data_dir,
    list_image_folder,
    load_image_folder,
    load_split,
    train_val_split,
)
from actrain.data.errors import DataError
from actrain.data.loaders import (
    ImageFolderLoader,
    InMemoryLoader,
    build_loader,
    make_imagefolder_loaders,
)
from actrain.data.registry import DATASETS, DatasetInfo, get_dataset_info
from actrain.data.sampling import balanced_subset_indices, epoch_generator, epoch_positions

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "ImageFolderLoader",
    "ImageTensors",
    "InMemoryLoader",
    "augment_batch",
    "balanced_subset_indices",
    "build_loader",
    "crop_flip",
    "default_data_dir",
    "epoch_generator",
    "epoch_positions",
    "get_dataset_info",
    "list_image_folder",
    "load_image_folder",
    "load_split",
    "make_imagefolder_loaders",
    "sample_crop_flip_params",
    "train_val_split",
]
