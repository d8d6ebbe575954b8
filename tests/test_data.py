"""Tests for actrain.data: real offline data, self-made CIFAR folders, augmentation, loaders."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actrain.data import (
    DATASETS,
    DataError,
    ImageFolderLoader,
    ImageTensors,
    InMemoryLoader,
    augment_batch,
    balanced_subset_indices,
    build_loader,
    crop_flip,
    get_dataset_info,
    load_split,
    make_imagefolder_loaders,
    sample_crop_flip_params,
    train_val_split,
)

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


def _shared_data() -> Path:
    env = os.environ.get("ACTRAIN_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = _shared_data()
needs_cifar_jpeg = pytest.mark.skipif(
    not (SHARED / "cifar10-jpeg" / "train").is_dir(), reason="shared CIFAR-10 jpeg copy missing"
)
needs_mnist = pytest.mark.skipif(
    not (SHARED / "MNIST" / "raw").is_dir(), reason="shared MNIST copy missing"
)


def _fake(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> ImageTensors:
    """Random images whose label is the example's own position, to track examples."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n), torch.arange(n), [str(i) for i in range(n)])


def _block_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test."""
    import torchvision.datasets as tvd

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    for cls in (tvd.MNIST, tvd.FashionMNIST, tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "download", forbidden)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", forbidden)


# ------------------------------------------------------------------------------------ registry


def test_registry_and_unknown_name() -> None:
    assert DATASETS["cifar10"].augment == "crop_flip"
    assert DATASETS["digits"].augment == "none" and DATASETS["digits"].image_size == 8
    assert DATASETS["imagefolder"].augment == "imagenet" and not DATASETS["imagefolder"].in_memory
    assert get_dataset_info("fmnist").name == "fashion_mnist"
    assert get_dataset_info("CIFAR-100").num_classes == 100
    assert get_dataset_info("Fashion-MNIST").name == "fashion_mnist"
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        load_split("cifar01", "train")
    with pytest.raises(DataError, match="split"):
        load_split("digits", "validation")


# ------------------------------------------------------------------------------------ sampling


def test_balanced_subset_indices() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3 + [3] * 17)
    idx = balanced_subset_indices(labels, 40, seed=5)
    assert idx.numel() == 40 and torch.equal(idx, idx.sort().values)
    assert idx.unique().numel() == 40
    # class 2 only has 3 examples: it gives all of them, the others share the rest evenly
    counts = torch.bincount(labels[idx]).tolist()
    assert counts[2] == 3 and sorted(counts) == [3, 12, 12, 13]
    assert torch.equal(idx, balanced_subset_indices(labels, 40, seed=5))
    assert not torch.equal(idx, balanced_subset_indices(labels, 40, seed=6))
    assert torch.equal(balanced_subset_indices(labels, 500, seed=0), torch.arange(100))
    assert torch.equal(balanced_subset_indices(labels, 100, seed=0), torch.arange(100))


def test_train_val_split_is_balanced_and_disjoint() -> None:
    data = _fake(60)
    data.labels = torch.arange(60) % 3
    train, val = train_val_split(data, 12, seed=1)
    assert len(train) == 48 and len(val) == 12
    assert torch.bincount(val.labels).tolist() == [4, 4, 4]
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(60))
    assert torch.equal(train.images[0], data.images[train.indices[0]])


# -------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed() -> None:
    from sklearn.datasets import load_digits

    train = load_split("digits", "train", seed=3)
    test = load_split("digits", "test", seed=7)
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(test.labels).tolist() == [36] * 10
    assert int(train.images.max()) == 255
    again = load_split("digits", "test", "/nonexistent", seed=123)
    assert torch.equal(test.images, again.images) and torch.equal(test.labels, again.labels)
    # every image is a rescaled sklearn image with the same label
    bunch = load_digits()
    ref = torch.from_numpy(np.floor(bunch.images * 255 / 16 + 0.5).astype(np.uint8)).flatten(1)
    match = (test.images.flatten(1)[:, None, :] == ref[None]).all(-1)  # [360, 1797]
    assert match.any(1).all()
    first = int(match[0].nonzero()[0])
    assert int(bunch.target[first]) == int(test.labels[0])
    sub = load_split("digits", "train", subset=100, seed=0)
    assert len(sub) == 100 and torch.bincount(sub.labels).tolist() == [10] * 10


# --------------------------------------------------------------------------------- cifar jpeg


@needs_cifar_jpeg
def test_cifar10_jpeg_subset() -> None:
    data = load_split("cifar10", "train", SHARED / "cifar10-jpeg", subset=200, seed=0)
    assert data.images.shape == (200, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == CIFAR10_CLASSES
    assert torch.bincount(data.labels, minlength=10).tolist() == [20] * 10
    assert torch.equal(data.labels, data.indices // 5000)  # 5000 files per class, class order
    assert torch.equal(data.indices, data.indices.sort().values)
    # the decoded pixels of a known file
    pos = int((data.labels == 3).nonzero()[0])
    number = int(data.indices[pos]) - 3 * 5000
    path = SHARED / "cifar10-jpeg" / "train" / "cat" / f"{number:04d}.jpg"
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(data.images[pos], expected)
    # root of the shared folder works too, and the subset depends on the seed
    same = load_split("cifar10", "train", SHARED, subset=200, seed=0)
    assert torch.equal(same.indices, data.indices)
    other = load_split("cifar10", "train", SHARED, subset=200, seed=1)
    assert not torch.equal(other.indices, data.indices)


# ------------------------------------------------------------------------ self-made CIFAR-100


def _write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def test_cifar100_pickle_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block_downloads(monkeypatch)
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = sorted(f"class_{i:03d}" for i in range(100))
    _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20})
    written = {}
    for split, n in (("train", 300), ("test", 100)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [i % 100 for i in range(n)]
        written[split] = (data, fine)
        _write_pickle(
            folder / split,
            {
                "filenames": [f"{i}.png" for i in range(n)],
                "batch_label": split,
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
                "data": data,
            },
        )
    for root in (tmp_path, folder):  # parent folder or the pickle folder itself
        train = load_split("cifar100", "train", root, download=False)
        assert train.images.shape == (300, 3, 32, 32) and train.classes == names
        data, fine = written["train"]
        assert torch.equal(train.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        assert train.labels.tolist() == fine
    test = load_split("cifar100", "test", tmp_path, download=False)
    assert len(test) == 100 and test.labels.tolist() == written["test"][1]
    sub = load_split("cifar100", "train", tmp_path, subset=200, seed=0, download=False)
    assert len(sub) == 200 and torch.bincount(sub.labels).tolist() == [2] * 100
    # the pixels of each kept example are those at its standard index
    assert torch.equal(sub.images, train.images[sub.indices])


def test_cifar10_pickle_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _write_pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES})
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        batches.append(data)
        _write_pickle(folder / name, {"data": data, "labels": [1, 2, 3, 4]})
    train = load_split("cifar10", "train", tmp_path, download=False)
    assert len(train) == 20 and train.labels.tolist() == [1, 2, 3, 4] * 5
    expected = np.concatenate(batches[:5]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert len(load_split("cifar10", "test", tmp_path, download=False)) == 4


def _write_png_folder(root: Path, classes: list[str], per_class: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{k:04d}.png")
                pixels[(split, cls, k)] = arr
    return pixels


def test_cifar100_image_folder_layout(tmp_path: Path) -> None:
    classes = [f"c{i:03d}" for i in range(100)]
    pixels = _write_png_folder(tmp_path, classes, 1, seed=2)
    test = load_split("cifar100", "test", tmp_path, download=False)
    assert test.images.shape == (100, 3, 32, 32) and test.classes == classes
    assert test.labels.tolist() == list(range(100))
    assert torch.equal(
        test.images[7].permute(1, 2, 0), torch.from_numpy(pixels[("test", "c007", 0)])
    )
    sub = load_split("cifar100", "train", tmp_path, subset=50, seed=0, download=False)
    assert len(sub) == 50 and sub.labels.unique().numel() == 50
    assert torch.equal(sub.labels, sub.indices)  # one file per class


def test_wrong_class_count_says_what_was_found(tmp_path: Path) -> None:
    _write_png_folder(tmp_path, ["a", "b", "c"], 1, seed=0)
    with pytest.raises(DataError, match="3 class folders.*expected 10"):
        load_split("cifar10", "train", tmp_path, download=False)


# ------------------------------------------------------------------------------------- MNIST


@needs_mnist
def test_mnist_from_shared_data() -> None:
    train = load_split("mnist", "train", SHARED)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    test = load_split("mnist", "test", SHARED / "MNIST")  # the MNIST folder itself
    assert len(test) == 10000 and train.labels.max() == 9
    sub = load_split("mnist", "test", SHARED, subset=100, seed=0)
    assert torch.bincount(sub.labels).tolist() == [10] * 10
    assert torch.equal(sub.images, test.images[sub.indices])


@pytest.mark.skipif(not (SHARED / "FashionMNIST" / "raw").is_dir(), reason="no FashionMNIST")
def test_fashion_mnist_alias() -> None:
    data = load_split("fmnist", "test", SHARED, subset=50)
    assert data.images.shape == (50, 1, 28, 28) and len(data.classes) == 10


# -------------------------------------------------------------------------------- error paths


def test_missing_folder_no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _block_downloads(monkeypatch)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="--data-dir") as info:
        load_split("mnist", "train", missing, download=False)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError) as info:
        load_split("cifar10", "train", missing, download=False)
    msg = str(info.value)
    assert "cifar-10-batches-py" in msg and "train/<class>" in msg and str(missing) in msg


def test_offline_download_failure_is_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    def offline(self: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error>")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    with pytest.raises(DataError, match="downloading it failed.*--data-dir"):
        load_split("fashion_mnist", "train", tmp_path, download=True)
    with pytest.raises(DataError, match="downloading it failed.*--data-dir"):
        load_split("cifar100", "test", tmp_path, download=True)


# ------------------------------------------------------------------------------- augmentation


def _reference_crop_flip(images: torch.Tensor, dy, dx, flip, pad: int = 4) -> torch.Tensor:
    """Per-example numpy version: reflect pad, slice, mirror."""
    out = []
    h, w = images.shape[2:]
    for i in range(images.shape[0]):
        x = images[i].numpy().astype(np.float32) / 255.0
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        crop = padded[:, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        if bool(flip[i]):
            crop = crop[:, :, ::-1]
        out.append(torch.from_numpy(crop.copy()))
    return torch.stack(out)


def test_crop_flip_matches_reference() -> None:
    images = _fake(64, size=32).images
    dy, dx, flip = sample_crop_flip_params(64, torch.Generator().manual_seed(0))
    assert 0 < int(flip.sum()) < 64 and int(dy.max()) <= 8 and int(dx.min()) >= 0
    out = crop_flip(images, dy, dx, flip)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, _reference_crop_flip(images, dy, dx, flip))
    # non-square images and one channel
    small = _fake(5, size=12, channels=1).images[:, :, :, :9]
    p = sample_crop_flip_params(5, torch.Generator().manual_seed(1))
    assert torch.equal(crop_flip(small, *p), _reference_crop_flip(small, *p))


def test_augment_batch_is_seeded() -> None:
    images = _fake(16).images
    a = augment_batch(images, "crop_flip", torch.Generator().manual_seed(3))
    b = augment_batch(images, "crop_flip", torch.Generator().manual_seed(3))
    c = augment_batch(images, "crop_flip", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(images, "none"), images.float() / 255)


# ------------------------------------------------------------------------------------ loaders


def _collect(batches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_loader_covers_epoch_and_resumes() -> None:
    data = _fake(103)
    loader = InMemoryLoader(data, 10, shuffle=True, augment="crop_flip", seed=1)
    assert len(loader) == 11 and loader.num_examples == 103
    x, y = _collect(loader.epoch(0))
    assert sorted(y.tolist()) == list(range(103))
    assert x.dtype == torch.float32 and x.shape == (103, 3, 32, 32)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x2, y2 = _collect(loader.epoch(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = _collect(loader.epoch(1))
    assert not torch.equal(y, y3)
    # same example, different epoch: different augmentation (for most examples)
    x3 = x3[torch.argsort(y3)]
    assert not torch.equal(x[torch.argsort(y)], x3)
    # mid-epoch resume yields exactly the tail of the full epoch
    tail_x, tail_y = _collect(loader.epoch(0, start_batch=4))
    assert torch.equal(tail_y, y[40:]) and torch.equal(tail_x, x[40:])
    assert list(loader.epoch(0, start_batch=11)) == []
    with pytest.raises(ValueError):
        loader.epoch(0, start_batch=12)


def test_loader_augmentation_does_not_depend_on_batching() -> None:
    data = _fake(40)
    a = InMemoryLoader(data, 7, shuffle=True, augment="crop_flip", seed=2)
    b = InMemoryLoader(data, 16, shuffle=False, augment="crop_flip", seed=2)
    xa, ya = _collect(a.epoch(5))
    xb, yb = _collect(b.epoch(5))
    assert torch.equal(xa[torch.argsort(ya)], xb[torch.argsort(yb)])
    other = InMemoryLoader(data, 7, shuffle=True, augment="crop_flip", seed=3)
    assert not torch.equal(_collect(other.epoch(5))[1], ya)


def test_eval_loader_and_channels_last() -> None:
    data = _fake(25)
    loader = InMemoryLoader(data, 8, shuffle=False, channels_last=True)
    x, y = _collect(loader.epoch(0))
    assert y.tolist() == list(range(25))
    assert torch.equal(x, data.images.float() / 255)
    first, _ = next(iter(loader.epoch(0)))
    assert first.is_contiguous(memory_format=torch.channels_last)
    dropped = InMemoryLoader(data, 8, shuffle=True, drop_last=True)
    assert len(dropped) == 3 and all(len(yb) == 8 for _, yb in dropped.epoch(0))


@pytest.mark.parametrize("n", [100, 101])
def test_distributed_shards(n: int) -> None:
    data = _fake(n)
    ranks = [InMemoryLoader(data, 8, shuffle=True, seed=4, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7
    ys = [_collect(r.epoch(3))[1] for r in ranks]
    assert ys[0].numel() == ys[1].numel() == -(-n // 2)
    assert set(ys[0].tolist()) | set(ys[1].tolist()) == set(range(n))
    if n % 2 == 0:
        assert set(ys[0].tolist()).isdisjoint(ys[1].tolist())
    single = _collect(InMemoryLoader(data, 8, shuffle=True, seed=4).epoch(3))[1]
    assert torch.equal(ys[0], single[0::2])
    assert torch.equal(ys[1][: n // 2], single[1::2])  # rank 1 is padded by wrapping around


def test_build_loader_digits() -> None:
    train = build_loader("digits", "train", 100, seed=0)
    test = build_loader("digits", "test", 100)
    assert isinstance(train, InMemoryLoader) and train.shuffle and train.augment == "none"
    assert not test.shuffle and len(test) == 4 and test.num_examples == 360


# ------------------------------------------------------------------------------- ImageFolder


@pytest.fixture()
def tiny_imagenet(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(5):
                arr = rng.integers(0, 256, (40 + k, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{k}.jpg")
    return tmp_path


def test_imagefolder_loaders(tiny_imagenet: Path) -> None:
    train, val = make_imagefolder_loaders(
        tiny_imagenet, 4, num_workers=0, crop_size=16, resize_size=20, seed=1
    )
    assert isinstance(train, ImageFolderLoader) and train.classes == ["ant", "bee"]
    # every training image each epoch: the last batch of 2 is trained (it was dropped)
    assert len(train) == 3 and len(val) == 3 and train.num_examples == 10
    rng_state = torch.get_rng_state()
    x, y = _collect(train.epoch(0))
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert sorted(y.tolist()) == [0] * 5 + [1] * 5
    x2, y2 = _collect(train.epoch(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    tx, ty = _collect(train.epoch(0, start_batch=1))
    assert torch.equal(tx, x[4:]) and torch.equal(ty, y[4:])
    assert not torch.equal(_collect(train.epoch(1))[0], x)
    vx, vy = _collect(val.epoch(0))
    assert vy.tolist() == [0] * 5 + [1] * 5 and vx.shape == (10, 3, 16, 16)
    # worker processes give the same batches as the main process
    with_workers = ImageFolderLoader(
        tiny_imagenet / "train", 4, train=True, num_workers=2, crop_size=16, seed=1
    )
    wx, wy = _collect(with_workers.epoch(0))
    assert torch.equal(wx, x) and torch.equal(wy, y)
    with pytest.raises(DataError, match="no training split"):
        make_imagefolder_loaders(tiny_imagenet / "train", 4, num_workers=0)
    shutil.rmtree(tiny_imagenet / "val")
    with pytest.raises(DataError, match="no evaluation split"):
        make_imagefolder_loaders(tiny_imagenet, 4, num_workers=0)


def test_a_folder_drops_only_a_lone_last_image_and_skips_hidden_folders(tiny_imagenet: Path):
    (tiny_imagenet / "train" / "bee" / "4.jpg").unlink()  # 9 images: batches of 4, 4 and 1
    (tiny_imagenet / "train" / ".ipynb_checkpoints").mkdir()  # not a class (it was refused)
    (tiny_imagenet / "val" / ".cache" / "x").mkdir(parents=True)
    train, val = make_imagefolder_loaders(tiny_imagenet, 4, num_workers=0, crop_size=16)
    assert train.classes == val.classes == ["ant", "bee"]
    assert len(train) == 2  # the lone ninth image waits for the next epoch's shuffle
    seen = [_collect(train.epoch(e))[1] for e in range(2)]
    assert all(len(ys) == 8 for ys in seen)


def test_a_folder_eval_split_in_memory_is_what_training_evaluated(tiny_imagenet: Path) -> None:
    # `actrain eval` needs the images in memory; it once refused every imagefolder run
    from actrain.data import load_folder_split

    full = load_folder_split(tiny_imagenet)
    assert full.images.shape == (10, 3, 224, 224) and full.images.dtype == torch.uint8
    assert full.labels.tolist() == [0] * 5 + [1] * 5 and full.classes == ["ant", "bee"]
    _, val = make_imagefolder_loaders(tiny_imagenet, 4, num_workers=0)
    vx, vy = _collect(val.epoch(0))  # the loader the run evaluated with while training
    assert torch.equal(full.images.float().div(255), vx) and torch.equal(full.labels, vy)
    part = load_folder_split(tiny_imagenet, subset=4, seed=1)
    assert part.labels.tolist().count(0) == 2 and len(part.labels) == 4
    assert torch.equal(part.images, full.images[part.indices])
    with pytest.raises(DataError, match="pass --test-subset"):
        load_folder_split(tiny_imagenet, limit=8)


def test_a_folder_eval_subset_larger_than_the_split_is_refused_analyses_take_at_most(
    tiny_imagenet: Path,
) -> None:
    # `actrain eval --test-subset 11` on a folder of 10 evaluated 10 images and said nothing;
    # the in-memory data sets refuse it naming both numbers, and so does a folder now
    from actrain.analysis.analyze import training_images
    from actrain.data import load_folder_split
    from actrain.evaluation.suite import load_eval_data

    val = re.escape(str(tiny_imagenet / "val"))
    with pytest.raises(DataError, match=rf"--test-subset: 11 images asked for, but {val} holds 10"):
        load_folder_split(tiny_imagenet, subset=11)
    cfg = {"dataset": "imagefolder", "data_dir": str(tiny_imagenet)}
    with pytest.raises(DataError, match=r"--test-subset: 11 images asked for, .* holds 10"):
        load_eval_data(cfg, None, None, 11, 0)  # what `actrain eval --test-subset 11` loads
    assert len(load_folder_split(tiny_imagenet, subset=10)) == 10  # all of it is fine
    with pytest.raises(DataError, match=r"--test-subset: must be a whole number"):
        load_folder_split(tiny_imagenet, subset=0)  # was taken as "all of them"
    # `actrain analyze --max-samples N` is "at most N": a smaller folder is analysed whole
    assert len(load_folder_split(tiny_imagenet, subset=11, split="train", at_most=True)) == 10
    assert len(training_images(cfg, max_samples=50)) == 10
