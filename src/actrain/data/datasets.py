"""Load small data sets into one uint8 tensor [N, C, H, W] (airbench style)."""

from __future__ import annotations

import contextlib
import numbers
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from actrain.data.errors import DataError
from actrain.data.registry import DatasetInfo, get_dataset_info
from actrain.data.sampling import balanced_subset_indices

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# What Pillow raises for a missing, unreadable, truncated or corrupt file (SyntaxError: "broken
# PNG file"; ValueError, EOFError, struct.error: malformed headers).
IMAGE_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
SPLITS = ("train", "test")
DIGITS_SPLIT_SEED = 0  # fixed so the digits test set never depends on the run seed
DIGITS_TEST_SIZE = 360

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@dataclass
class ImageTensors:
    """A whole split in memory; `indices` keeps each example's position in the standard order.

    Keeping the original positions makes subsets and validation splits traceable back to files.
    """

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N]
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.indices.shape != (n,):
            raise ValueError(
                f"labels/indices must have shape ({n},), got {tuple(self.labels.shape)} and "
                f"{tuple(self.indices.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def select(self, positions: torch.Tensor) -> ImageTensors:
        """Rows at `positions` (positions in this object, not standard-order indices)."""
        pos = torch.as_tensor(positions, dtype=torch.int64)
        return ImageTensors(
            self.images[pos.to(self.images.device)],
            self.labels[pos.to(self.labels.device)],
            self.indices[pos.to(self.indices.device)],
            list(self.classes),
        )

    def to(self, device: torch.device | str) -> ImageTensors:
        """Move images and labels (not the bookkeeping indices) to `device`."""
        return ImageTensors(
            self.images.to(device), self.labels.to(device), self.indices, list(self.classes)
        )


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """Last non-empty line of an exception (where torchvision puts the real cause), shortened."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_read_error(path: str | os.PathLike[str], exc: BaseException) -> DataError:
    """A one-line DataError naming an image file that cannot be decoded, and why.

    One bad file among thousands otherwise surfaces as Pillow's traceback without the path.
    """
    p = Path(path)
    if p.is_symlink() and not p.exists():
        reason = f"broken symbolic link (its target {os.readlink(p)} does not exist)"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image Pillow can read (wrong extension, or an empty or corrupt file)"
    elif isinstance(exc, FileNotFoundError):
        reason = "file not found (removed while loading?)"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
    else:
        reason = f"truncated or corrupt image ({_one_line(exc)})"
    return DataError(f"cannot read image {p}: {reason}; replace or remove the file")


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class folder names of an ImageFolder split (hidden folders skipped)."""
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def check_same_classes(
    train_dir: Path, train_classes: list[str], eval_dir: Path, eval_classes: list[str]
) -> None:
    """Refuse splits whose class folders differ.

    Labels are positions in each split's own sorted folder list, so a missing or renamed folder
    silently gives the evaluation images the labels of other training classes.
    """
    if train_classes == eval_classes:
        return

    def names(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

    only_train = sorted(set(train_classes) - set(eval_classes))
    only_eval = sorted(set(eval_classes) - set(train_classes))
    parts = [f"only in {train_dir.name}/: {names(only_train)}"] if only_train else []
    parts += [f"only in {eval_dir.name}/: {names(only_eval)}"] if only_eval else []
    raise DataError(
        f"class folders differ between {train_dir} and {eval_dir} ({'; '.join(parts)}); "
        "labels come from the sorted folder names, so both splits need the same class folders"
    )


def default_data_dir() -> Path:
    """$ACTRAIN_DATA or ~/.cache/actrain/data: where downloads go when no --data-dir is given."""
    return Path(os.environ.get("ACTRAIN_DATA") or "~/.cache/actrain/data").expanduser()


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    flag: str = "subset",
) -> ImageTensors:
    """Load split "train" or "test" of an in-memory data set as uint8 tensors on the CPU.

    `subset` keeps a seeded class-balanced subset (decoding only those files for image folders).
    A subset larger than the split is refused rather than cut to the split: a user asking for N
    images would otherwise train or evaluate on fewer without knowing. `flag` names the option
    that gave `subset` in the messages (e.g. ``--test-subset``).
    """
    info = get_dataset_info(name)
    if not info.in_memory:
        raise DataError(
            f"dataset '{info.name}' is streamed from disk, not loaded into memory; "
            "use make_imagefolder_loaders"
        )
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected 'train' or 'test')")
    _check_subset(subset, flag)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()

    if info.name in ("cifar10", "cifar100"):
        return _load_cifar(
            info, split, root, subset=subset, seed=seed, download=download, flag=flag
        )
    if info.name == "digits":
        data = _load_digits(split)
    else:
        data = _load_mnist_family(info.name, split, root, download=download)
    return _subset(data, subset, seed, f"the {info.name} {split} split", flag)


def _check_subset(subset: object, flag: str = "subset") -> None:
    """A subset size must be a whole positive number (``subset=2.5`` failed deep in indexing)."""
    if subset is None:
        return
    if isinstance(subset, bool) or not isinstance(subset, numbers.Integral) or subset < 1:
        raise DataError(f"{flag}: must be a whole number of images >= 1, got {subset!r}")


def _subset_positions(
    labels: torch.Tensor, subset: int | None, seed: int, where: str, flag: str
) -> torch.Tensor:
    """The class-balanced positions of ``subset`` (all of them for None); more than there are
    is refused, naming both numbers."""
    total = len(labels)
    if subset is None:
        return torch.arange(total)
    _check_subset(subset, flag)
    if subset > total:
        raise DataError(
            f"{flag}: {subset} images asked for, but {where} holds {total};"
            f" use at most {total} (or leave it out for all of them)"
        )
    return balanced_subset_indices(labels, int(subset), seed)


def train_val_split(
    data: ImageTensors, val_size: int, seed: int
) -> tuple[ImageTensors, ImageTensors]:
    """Class-balanced seeded hold-out: (train, val), both keeping standard-order indices."""
    if not 0 < val_size < len(data):
        raise DataError(f"val_size must be between 1 and {len(data) - 1}, got {val_size}")
    val_pos = balanced_subset_indices(data.labels, val_size, seed)
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[val_pos] = False
    train_pos = keep.nonzero().flatten()
    return data.select(train_pos), data.select(val_pos)


# --------------------------------------------------------------------------------------- digits


def _load_digits(split: str) -> ImageTensors:
    """sklearn's bundled 8x8 digits with a fixed balanced test split (no files needed)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    scaled = np.floor(bunch.images * (255.0 / 16.0) + 0.5)
    images = torch.from_numpy(scaled.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    test_pos = balanced_subset_indices(labels, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    in_test = torch.zeros(labels.numel(), dtype=torch.bool)
    in_test[test_pos] = True
    pos = test_pos if split == "test" else (~in_test).nonzero().flatten()
    return ImageTensors(
        images[pos].contiguous(),
        labels[pos],
        torch.arange(pos.numel()),
        [str(d) for d in range(10)],
    )


# ------------------------------------------------------------------------------ MNIST family


def _load_mnist_family(name: str, split: str, root: Path, *, download: bool) -> ImageTensors:
    """torchvision MNIST/FashionMNIST; `root` may be the parent of MNIST/ or MNIST/ itself."""
    from torchvision import datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    folder = cls.__name__
    if root.name == folder and (root / "raw").is_dir():
        root = root.parent
    raw = root / folder / "raw"
    processed = root / folder / "processed"
    needed = [
        raw / f"{p}-{kind}-idx{d}-ubyte"
        for p in ("train", "t10k")
        for kind, d in (("images", 3), ("labels", 1))
    ]
    have_raw = all(p.is_file() for p in needed)
    have_legacy = all((processed / f).is_file() for f in ("training.pt", "test.pt"))
    if not (have_raw or have_legacy):
        hint = f"pass --data-dir pointing at a folder that contains {folder}/raw/"
        if not download:
            raise DataError(
                f"{folder} not found: expected the 4 idx files in {raw}; {hint} (or leave out"
                " --no-download to download it)"
            )
        try:
            with _no_leftovers(root / folder):
                cls(str(root), train=split == "train", download=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise DataError(
                f"{folder} not found in {raw} and downloading it failed ({_one_line(exc)}); "
                f"if offline, {hint}"
            ) from exc
    try:
        ds = cls(str(root), train=split == "train", download=False)
    except RuntimeError as exc:
        raise DataError(
            f"could not read {folder} from {raw}: {_one_line(exc)}; delete {raw} and run again"
            " to download it afresh (or copy it again)"
        ) from exc
    images = ds.data.to(torch.uint8).unsqueeze(1).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageTensors(images, labels, torch.arange(labels.numel()), list(ds.classes))


# ------------------------------------------------------------------------------------- CIFAR

_CIFAR_PICKLE = {
    # name: (folder, train files, test files, meta file, label key, class-name key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}


def _layouts_help(name: str) -> str:
    folder = _CIFAR_PICKLE[name][0]
    return (
        f"expected either the torchvision pickle folder '{folder}' or an image-folder layout "
        "'train/<class>/*.jpg|png' + 'test/<class>/...'"
    )


def _load_cifar(
    info: DatasetInfo,
    split: str,
    root: Path,
    *,
    subset: int | None,
    seed: int,
    download: bool,
    flag: str = "subset",
) -> ImageTensors:
    """Detect the on-disk layout (pickle batches or image folders) and load one split."""
    pickle_dir = _find_cifar_pickle_dir(info.name, root)
    if pickle_dir is not None:
        data = _read_cifar_pickle(info.name, pickle_dir, split)
        return _subset(data, subset, seed, f"the {info.name} {split} split", flag)
    folder = _find_image_folder_root(info.name, root)
    if folder is not None:
        # train and test are loaded by separate calls: compare with the other split here.
        train_dir, test_dir = folder / "train", folder / "test"
        if train_dir.is_dir() and test_dir.is_dir():
            check_same_classes(
                train_dir, class_folders(train_dir), test_dir, class_folders(test_dir)
            )
        return load_image_folder(
            folder / split,
            num_classes=info.num_classes,
            image_size=info.image_size,
            subset=subset,
            seed=seed,
            flag=flag,
        )
    layouts = _layouts_help(info.name)
    if not download:
        raise DataError(
            f"{info.name} not found under {root}: {layouts}; pass --data-dir with a folder that"
            " holds it (or leave out --no-download to download it)"
        )
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if info.name == "cifar10" else tvd.CIFAR100
    try:
        with _no_leftovers(root / _CIFAR_PICKLE[info.name][0]):
            cls(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(
            f"{info.name} not found under {root} and downloading it failed ({_one_line(exc)}): "
            f"{layouts}; if offline, pass --data-dir with a folder that holds it"
        ) from exc
    data = _read_cifar_pickle(info.name, root / _CIFAR_PICKLE[info.name][0], split)
    return _subset(data, subset, seed, f"the {info.name} {split} split", flag)


@contextlib.contextmanager
def _no_leftovers(folder: Path):
    """A download into ``folder`` that fails leaves none of the empty folders it made (they
    piled up, ``<Name>/raw`` in the user's data folder, after every offline attempt)."""
    made = [p for p in (folder, folder / "raw") if not p.exists()]
    parent = folder.parent  # the data folder itself (~/.cache/actrain/data), made on the way
    while not parent.exists() and parent != parent.parent:
        made.insert(0, parent)
        parent = parent.parent
    try:
        yield
    except BaseException:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty: a partial download stays for the message to name
        raise


def _subset(
    data: ImageTensors, subset: int | None, seed: int, where: str, flag: str
) -> ImageTensors:
    if subset is None:
        return data
    return data.select(_subset_positions(data.labels, subset, seed, where, flag))


def _find_cifar_pickle_dir(name: str, root: Path) -> Path | None:
    folder = _CIFAR_PICKLE[name][0]
    for cand in (root, root / folder):
        if cand.name == folder and cand.is_dir():
            return cand
    return None


def _find_image_folder_root(name: str, root: Path) -> Path | None:
    """`root` itself, or root/<name>-jpeg, root/<name> holding train/ or test/ class folders."""
    for cand in (root, root / f"{name}-jpeg", root / name):
        if (cand / "train").is_dir() or (cand / "test").is_dir():
            return cand
    return None


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR python batch (pickled under Python 2, hence latin1; keys may be bytes)."""
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_pickle(name: str, folder: Path, split: str) -> ImageTensors:
    """Own reader of the torchvision/Krizhevsky pickle format.

    torchvision's CIFAR classes insist on the published md5 sums, which rejects re-packed or
    test-made folders; the format itself is simple: 'data' uint8 [N, 3072] in CHW row order.
    """
    base, train_files, test_files, meta_file, label_key, names_key = _CIFAR_PICKLE[name]
    files = train_files if split == "train" else test_files
    missing = [f for f in files if not (folder / f).is_file()]
    # what an interrupted download or extraction leaves: the way out, with the error
    redo = f"; delete {folder} and run again to download it afresh (or copy it again)"
    if missing:
        raise DataError(
            f"{folder} is missing {', '.join(missing)} (expected torchvision's '{base}'"
            f" layout){redo}"
        )
    chunks, labels = [], []
    for fname in files:
        try:
            entry = _unpickle(folder / fname)
            chunks.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry[label_key])
        except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            raise DataError(
                f"{folder / fname} is not a valid {name} pickle batch: {exc}{redo}"
            ) from exc
    images = torch.from_numpy(np.concatenate(chunks))
    label_t = torch.tensor(labels, dtype=torch.int64)
    num_classes = 10 if name == "cifar10" else 100
    if (folder / meta_file).is_file():
        try:
            classes = [str(c) for c in _unpickle(folder / meta_file)[names_key]]
        except (KeyError, ValueError, TypeError, pickle.UnpicklingError, EOFError) as exc:
            raise DataError(
                f"{folder / meta_file} is not a valid {name} meta file: {exc!r}{redo}"
            ) from exc
    else:
        classes = list(CIFAR10_CLASSES) if name == "cifar10" else [str(i) for i in range(100)]
    if len(classes) != num_classes:
        raise DataError(
            f"{folder / meta_file} lists {len(classes)} classes, expected {num_classes}"
        )
    return ImageTensors(images, label_t, torch.arange(label_t.numel()), classes)


# ------------------------------------------------------------------------------ image folders


def list_image_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files of an ImageFolder split in standard order: sorted class, then sorted file name."""
    if not split_dir.is_dir():
        raise DataError(f"folder not found: {split_dir} (expected {split_dir}/<class>/*.jpg|png)")
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg|png)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        entries = [
            e for e in os.scandir(split_dir / cls) if e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        for e in entries:
            if e.is_symlink() and not os.path.exists(e.path):
                # is_file() is False for it, so it would otherwise be skipped without a word
                raise image_read_error(e.path, FileNotFoundError(e.path))
        names = sorted(e.name for e in entries if e.is_file())
        if not names:
            raise DataError(f"class folder {split_dir / cls} has no .jpg/.png images")
        paths.extend(split_dir / cls / n for n in names)
        labels.extend([label] * len(names))
    return paths, labels, classes


def _decode_into(out: np.ndarray, paths: list[Path], start: int, stop: int) -> None:
    h, w = out.shape[1:3]
    for i in range(start, stop):
        try:
            with Image.open(paths[i]) as im:
                size = im.size
                rgb = np.asarray(im.convert("RGB")) if size == (w, h) else None
        except IMAGE_READ_ERRORS as exc:
            raise image_read_error(paths[i], exc) from exc
        if rgb is None:
            raise DataError(f"{paths[i]} is {size[0]}x{size[1]}, expected {w}x{h}")
        out[i] = rgb


def decode_images(paths: list[Path], size: int, workers: int | None = None) -> np.ndarray:
    """Decode same-size RGB images into uint8 [N, H, W, 3] with a small thread pool.

    Pillow releases the GIL while decoding, so threads give a real speed-up without the
    pickling cost of processes.
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if len(paths) < 512 or workers <= 1:
        _decode_into(out, paths, 0, len(paths))
        return out
    step = -(-len(paths) // (workers * 4))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(_decode_into, out, paths, s, min(s + step, len(paths)))
            for s in range(0, len(paths), step)
        ]
        try:
            for fut in futures:
                fut.result()
        except BaseException:  # a bad image or Ctrl-C: not after decoding all the others
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out


def load_image_folder(
    split_dir: str | os.PathLike[str],
    *,
    num_classes: int | None,
    image_size: int | None,
    subset: int | None = None,
    seed: int = 0,
    flag: str = "subset",
) -> ImageTensors:
    """Decode an ImageFolder split of small fixed-size images into memory.

    With `subset`, the balanced subset of files is chosen before decoding, so small experiments
    on a large folder only pay for the images they use (more than the folder holds is refused).
    """
    split_dir = Path(split_dir)
    paths, labels, classes = list_image_folder(split_dir)
    if num_classes is not None and len(classes) != num_classes:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise DataError(
            f"{split_dir} has {len(classes)} class folders ({shown}), expected {num_classes}"
        )
    label_t = torch.tensor(labels, dtype=torch.int64)
    pos = _subset_positions(label_t, subset, seed, str(split_dir), flag)
    chosen = [paths[i] for i in pos.tolist()]
    if image_size is None:
        try:
            with Image.open(chosen[0]) as im:
                image_size = im.size[0]
        except IMAGE_READ_ERRORS as exc:
            raise image_read_error(chosen[0], exc) from exc
    array = decode_images(chosen, image_size)
    images = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, label_t[pos], pos, classes)
