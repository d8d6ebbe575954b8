"""Epoch-addressable loaders: `loader.epoch(e, start_batch)` is a pure function of (seed, e)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from actrain.data.augment import AUGMENTATIONS, crop_flip, sample_crop_flip_params, to_float01
from actrain.data.datasets import (
    IMAGE_READ_ERRORS,
    ImageTensors,
    _check_subset,
    _subset_positions,
    check_same_classes,
    class_folders,
    default_data_dir,
    image_read_error,
    load_split,
)
from actrain.data.errors import DataError
from actrain.data.registry import get_dataset_info
from actrain.data.sampling import (
    STREAM_AUGMENT,
    epoch_generator,
    epoch_positions,
    shard_size,
)

if TYPE_CHECKING:
    from PIL import Image
    from torchvision.datasets import ImageFolder

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_distributed(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _num_batches(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_rank = shard_size(n, world_size, drop_last)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def _check_start(start_batch: int, num_batches: int) -> None:
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch must be in [0, {num_batches}], got {start_batch}")


class InMemoryLoader:
    """Batches from a uint8 tensor kept on `device`, augmented there in one batched op.

    `batch_size` is per rank. Order and augmentation of epoch e come from generators seeded
    with (seed, e), and augmentation parameters are drawn per example (not per batch), so a
    resumed epoch (start_batch > 0) yields exactly the remaining batches of the full epoch.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool,
        augment: str = "none",
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        _check_distributed(batch_size, rank, world_size)
        if augment not in AUGMENTATIONS:
            raise ValueError(
                f"unknown in-memory augmentation '{augment}' (expected {', '.join(AUGMENTATIONS)})"
            )
        if len(data) == 0:
            raise DataError("cannot build a loader over an empty data set")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.indices = data.indices
        self.classes = list(data.classes)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self._n = len(data)
        self._num_batches = _num_batches(self._n, batch_size, world_size, drop_last)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self._num_batches

    @property
    def num_examples(self) -> int:
        """Examples in the underlying data (all ranks together, before padding/dropping)."""
        return self._n

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Positions (into the data) this rank visits in `epoch`, in order, on the CPU."""
        order = epoch_positions(
            self._n,
            epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        )
        return order[: self._num_batches * self.batch_size]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Float32 [0, 1] images and int64 labels on the device for one epoch of this rank."""
        _check_start(start_batch, self._num_batches)
        return self._iterate(epoch, start_batch)

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order = self.epoch_order(epoch).to(self.device)
        params = None
        if self.augment == "crop_flip":
            # Drawn for every example of the data set, indexed by position: independent of
            # batch size, rank and start_batch.
            gen = epoch_generator(self.seed, epoch, STREAM_AUGMENT)
            params = [t.to(self.device) for t in sample_crop_flip_params(self._n, gen)]
        bs = self.batch_size
        for b in range(start_batch, self._num_batches):
            idx = order[b * bs : (b + 1) * bs]
            raw = self.images[idx]
            if params is not None:
                x = crop_flip(raw, params[0][idx], params[1][idx], params[2][idx])
            else:
                x = to_float01(raw)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


# ------------------------------------------------------------------------------ image folders


class _EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, per-example seed), set per epoch from the main process.

    The sampler runs in the main process even with persistent workers, so changing its epoch
    between iterations is enough; the per-example seed makes worker-side random transforms
    reproducible regardless of which worker handles the example.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_batches = _num_batches(n, batch_size, world_size, drop_last)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        _check_start(start_batch, self.num_batches)
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_positions(
            self.n,
            self.epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        ).tolist()
        gen = epoch_generator(self.seed, self.epoch, STREAM_AUGMENT)
        seeds = torch.randint(0, 1 << 62, (self.n,), generator=gen).tolist()
        bs = self.batch_size
        for b in range(self.start_batch, self.num_batches):
            yield [(i, seeds[i]) for i in order[b * bs : (b + 1) * bs]]


class _SeededImageDataset(Dataset):
    """ImageFolder samples transformed under a per-example seed (global RNG left untouched).

    A file that cannot be decoded raises DataError naming it; DataError keeps its one-line
    message when DataLoader re-raises it from a worker process.
    """

    def __init__(
        self, folder: ImageFolder, transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.folder = folder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = item
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except IMAGE_READ_ERRORS as exc:
            raise image_read_error(path, exc) from exc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(image), label


_VisibleImageFolder = None


def _visible_image_folder(tvd):
    """torchvision's ImageFolder with the class folders :func:`class_folders` sees (hidden
    ones such as ``.ipynb_checkpoints`` skipped, as for the CIFAR image folders and in
    evaluation); made once, at module level so that DataLoader workers can unpickle it."""
    global _VisibleImageFolder
    if _VisibleImageFolder is None:

        class VisibleImageFolder(tvd.ImageFolder):
            def find_classes(self, directory):
                classes = class_folders(Path(directory))
                if not classes:
                    raise FileNotFoundError(f"no class folders in {directory}")
                return classes, {c: i for i, c in enumerate(classes)}

        VisibleImageFolder.__qualname__ = VisibleImageFolder.__name__ = "_VisibleImageFolder"
        _VisibleImageFolder = VisibleImageFolder
    return _VisibleImageFolder


class ImageFolderLoader:
    """Large ImageFolder data streamed by DataLoader workers, with InMemoryLoader's interface.

    Workers return uint8 crops (4x less IPC and pinned memory than float); conversion to float
    [0, 1] happens on the device. Sharding follows DistributedSampler semantics (strided slice
    of a shared (seed, epoch) permutation, padded to equal length unless drop_last).
    """

    def __init__(
        self,
        split_dir: str | os.PathLike[str],
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        num_workers: int = 8,
        pin_memory: bool | None = None,
        drop_last: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        crop_size: int = 224,
        resize_size: int = 256,
    ) -> None:
        from torchvision import datasets as tvd
        from torchvision import transforms as T

        _check_distributed(batch_size, rank, world_size)
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise DataError(f"folder not found: {split_dir} (expected {split_dir}/<class>/*.jpg)")
        try:
            self.folder = _visible_image_folder(tvd)(str(split_dir))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(
                f"{split_dir} is not an image folder (expected <class>/*.jpg|png): {exc}"
            ) from exc
        if train:
            transform = T.Compose(
                [T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(), T.PILToTensor()]
            )
        else:
            transform = T.Compose([T.Resize(resize_size), T.CenterCrop(crop_size), T.PILToTensor()])
        self.device = torch.device(device)
        self.classes = list(self.folder.classes)
        self.channels_last = channels_last
        self.train = train
        n = len(self.folder.samples)
        # as the in-memory loader: every image each epoch, except a lone last one (batch norm
        # cannot train on a batch of one), which waits for the next epoch's shuffle
        lone_last = shard_size(n, world_size, False) % batch_size == 1 and batch_size > 1
        drop = (train and lone_last) if drop_last is None else drop_last
        self.sampler = _EpochBatchSampler(
            len(self.folder.samples),
            batch_size,
            shuffle=train,
            drop_last=drop,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.loader = DataLoader(
            _SeededImageDataset(self.folder, transform),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
            # own generator: DataLoader would otherwise draw worker seeds from the global RNG
            generator=torch.Generator(),
        )

    def __len__(self) -> int:
        return self.sampler.num_batches

    @property
    def num_examples(self) -> int:
        return len(self.folder.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """DistributedSampler-style hook; epoch() calls it itself."""
        self.sampler.set_epoch(epoch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Float32 [0, 1] images and int64 labels on the device for one epoch of this rank."""
        self.sampler.set_epoch(epoch, start_batch)
        return self._iterate()

    def _iterate(self) -> Iterator[Batch]:
        non_blocking = self.loader.pin_memory
        for images, labels in self.loader:
            x = images.to(self.device, non_blocking=non_blocking).float().div_(255.0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(self.device, non_blocking=non_blocking)


def _find_eval_dir(root: Path) -> Path:
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"no evaluation split in {root} (expected {root}/val/<class>/ or test/)")


def _check_against_other_split(root: Path, split_dir: Path, classes: list[str]) -> None:
    """Compare one streamed split's classes with its sibling split (train vs val/test), if any."""
    train_dir = root / "train"
    if split_dir == train_dir:
        other = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    else:
        other = train_dir if train_dir.is_dir() else None
    if other is None:
        return
    # numbered as torchvision's ImageFolder numbers them: every sub-folder, sorted
    other_classes = sorted(e.name for e in os.scandir(other) if e.is_dir())
    if split_dir == train_dir:
        check_same_classes(split_dir, classes, other, other_classes)
    else:
        check_same_classes(other, other_classes, split_dir, classes)


# An evaluation split held in memory for the attacks: beyond this many images, ask for a subset
FOLDER_EVAL_LIMIT = 10_000


def decode_subset(loader: ImageFolderLoader, keep: torch.Tensor) -> ImageTensors:
    """Images ``keep`` of an evaluation loader's folder, through its transform (resize and
    centre crop), as uint8 tensors on the CPU: what the attacks need in memory."""
    dataset = loader.loader.dataset
    items = [dataset[(int(i), 0)] for i in keep]
    images = torch.stack([img for img, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return ImageTensors(images, labels, keep.long(), list(loader.classes))


def load_folder_split(
    data_dir: str | os.PathLike[str],
    *,
    subset: int | None = None,
    seed: int = 0,
    limit: int | None = FOLDER_EVAL_LIMIT,
    split: str = "val",
    flag: str = "--test-subset",
    at_most: bool = False,
) -> ImageTensors:
    """The val (or test) split of an ImageNet-style folder in memory, as the run evaluated it
    while training (resize 256, centre crop 224), for ``actrain eval``; a seeded class-balanced
    ``subset``. A split of more than ``limit`` images needs a subset (``flag`` names the
    option that gives it; ImageNet's 50,000 would take 7.5 GB). ``split="train"``: the
    training images through the same transform (the analyses' probe set).

    A ``subset`` larger than the split is refused, naming both numbers, as for the in-memory
    data sets (``--test-subset 500`` must not quietly evaluate 300 images); ``at_most=True``
    takes the whole split instead (``actrain analyze --max-samples N`` means "at most N")."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"folder not found: {root} (expected {root}/val/<class>/*.jpg)")
    folder = root / "train" if split == "train" else _find_eval_dir(root)
    loader = ImageFolderLoader(folder, 1, train=False, num_workers=0)
    if (root / "train").is_dir():
        _check_against_other_split(root, folder, loader.classes)
    targets = torch.tensor(loader.folder.targets)
    if subset is None and limit is not None and len(targets) > limit:
        raise DataError(
            f"{folder} holds {len(targets)} images, which would be held in memory: pass"
            f" {flag} N (a class-balanced, seeded subset; RobustBench evaluates ImageNet on"
            " 5,000)"
        )
    if at_most and subset is not None:
        _check_subset(subset, flag)
        subset = min(subset, len(targets))
    keep = _subset_positions(targets, subset, seed, str(folder), flag)
    return decode_subset(loader, keep)


def make_imagefolder_loaders(
    data_dir: str | os.PathLike[str],
    batch_size: int,
    *,
    eval_batch_size: int | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 8,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    crop_size: int = 224,
    resize_size: int = 256,
) -> tuple[ImageFolderLoader, ImageFolderLoader]:
    """(train, eval) loaders for data_dir/train and data_dir/val (or test), ImageNet-style."""
    root = Path(data_dir).expanduser()
    if not (root / "train").is_dir():
        raise DataError(f"no training split in {root} (expected {root}/train/<class>/*.jpg)")

    def make(split_dir: Path, size: int, train: bool) -> ImageFolderLoader:
        return ImageFolderLoader(
            split_dir,
            size,
            train=train,
            device=device,
            num_workers=num_workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
            crop_size=crop_size,
            resize_size=resize_size,
        )

    train = make(root / "train", batch_size, True)
    eval_dir = _find_eval_dir(root)
    evaluation = make(eval_dir, eval_batch_size or batch_size, False)
    check_same_classes(root / "train", train.classes, eval_dir, evaluation.classes)
    return train, evaluation


def build_loader(
    name: str,
    split: str,
    batch_size: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    train: bool | None = None,
    drop_last: bool = False,
    seed: int = 0,
    subset: int | None = None,
    download: bool = True,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    num_workers: int = 8,
) -> InMemoryLoader | ImageFolderLoader:
    """One loader for (name, split); `train` (default: split == "train") shuffles and augments."""
    info = get_dataset_info(name)
    is_train = split == "train" if train is None else train
    if not info.in_memory:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        split_dir = root / "train" if split == "train" else _find_eval_dir(root)
        loader = ImageFolderLoader(
            split_dir,
            batch_size,
            train=is_train,
            device=device,
            num_workers=num_workers,
            drop_last=drop_last,
            seed=seed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
        )
        _check_against_other_split(root, split_dir, loader.classes)
        return loader
    data = load_split(info.name, split, data_dir, subset=subset, seed=seed, download=download)
    return InMemoryLoader(
        data,
        batch_size,
        device=device,
        shuffle=is_train,
        augment=info.augment if is_train else "none",
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
