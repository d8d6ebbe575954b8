"""Broken data reaches the user as one DataError line naming the file or folders, never a traceback.

Covers unreadable images (truncated, not an image, broken symlink) in both the in-memory folder
loader and the streamed ImageFolder loader (with and without worker processes), and class folders
that differ between the training and the evaluation split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actrain.cli import main
from actrain.data import (
    DataError,
    ImageFolderLoader,
    build_loader,
    load_split,
    make_imagefolder_loaders,
)
from actrain.data.errors import original_message

CIFAR_CLASSES = [f"c{i}" for i in range(10)]


def _write_folder(
    root: Path,
    splits: dict[str, list[str]],
    *,
    per_class: int = 2,
    size: int = 32,
    ext: str = "png",
) -> Path:
    """split/<class>/<k>.<ext> random RGB images, e.g. {"train": ["a", "b"], "val": [...]}."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for k in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{k}.{ext}")
    return root


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _one_line_error(exc: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _read_all(loader: ImageFolderLoader) -> int:
    return sum(int(y.numel()) for _, y in loader.epoch(0))


# --------------------------------------------------------------------- streamed ImageFolder


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    ("ext", "keep", "reason"),
    [("png", 50, "truncated"), ("jpg", None, "truncated")],
)
def test_streamed_broken_image_names_the_file(
    tmp_path: Path, num_workers: int, ext: str, keep: int | None, reason: str
) -> None:
    root = _write_folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, size=40, ext=ext)
    bad = root / "train" / "b" / f"1.{ext}"
    _truncate(bad, keep if keep is not None else len(bad.read_bytes()) // 2)  # half-written
    train, _ = make_imagefolder_loaders(
        root, 4, num_workers=num_workers, crop_size=16, resize_size=20
    )
    with pytest.raises(DataError) as exc:
        _read_all(train)  # 4 images, batch 4: the bad one is read in the first batch
    msg = _one_line_error(exc)
    assert msg.startswith(f"cannot read image {bad}: ") and reason in msg


def test_streamed_broken_symlink_fails_valid_symlink_works(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, size=40)
    (root / "train" / "a" / "link.png").symlink_to(root / "val" / "a" / "0.png")
    loader = ImageFolderLoader(root / "train", 5, train=False, num_workers=0, crop_size=16)
    assert _read_all(loader) == 5  # the valid link is read like a file
    broken = root / "train" / "b" / "broken.png"
    broken.symlink_to("/nonexistent")
    loader = ImageFolderLoader(root / "train", 6, train=False, num_workers=2, crop_size=16)
    with pytest.raises(DataError) as exc:
        _read_all(loader)
    msg = _one_line_error(exc)
    assert str(broken) in msg and "broken symbolic link" in msg and "/nonexistent" in msg


def test_worker_traceback_message_is_reduced_to_the_original_line() -> None:
    """DataLoader's re-raise (type(exc)(message with the worker traceback)) keeps one line."""
    from torch._utils import ExceptionWrapper

    try:
        try:
            raise OSError("image file is truncated")
        except OSError as cause:
            raise DataError("cannot read image x.png: truncated") from cause
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(DataError) as exc:
        wrapper.reraise()
    assert str(exc.value) == "cannot read image x.png: truncated"
    # ordinary messages, including multi-line ones, are left alone
    assert original_message("a\nb", DataError) == "a\nb"
    assert str(DataError("Caught nothing")) == "Caught nothing"


@pytest.mark.parametrize("loader_fn", ["make_imagefolder_loaders", "build_loader"])
def test_streamed_class_folders_must_match(tmp_path: Path, loader_fn: str) -> None:
    root = _write_folder(tmp_path, {"train": ["a", "b", "c"], "val": ["a", "c"]}, size=40)
    with pytest.raises(DataError) as exc:
        if loader_fn == "build_loader":
            build_loader("imagefolder", "test", 2, data_dir=root, num_workers=0)
        else:
            make_imagefolder_loaders(root, 2, num_workers=0)
    msg = _one_line_error(exc)
    assert "class folders differ" in msg and "only in train/: b" in msg
    (root / "val" / "b").mkdir()
    Image.new("RGB", (40, 40)).save(root / "val" / "b" / "0.png")
    train, val = make_imagefolder_loaders(root, 2, num_workers=0, crop_size=16, resize_size=20)
    assert train.classes == val.classes == ["a", "b", "c"]


# ------------------------------------------------------------------------ in-memory folders


def test_in_memory_truncated_png_names_the_file(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": CIFAR_CLASSES, "test": CIFAR_CLASSES})
    bad = root / "train" / "c3" / "1.png"
    _truncate(bad, 50)
    with pytest.raises(DataError) as exc:
        load_split("cifar10", "train", root, download=False)
    msg = _one_line_error(exc)
    assert msg.startswith(f"cannot read image {bad}: ") and "truncated" in msg
    assert len(load_split("cifar10", "test", root, download=False)) == 20  # other split fine


def test_in_memory_text_file_named_jpg(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": CIFAR_CLASSES, "test": CIFAR_CLASSES})
    fake = root / "test" / "c9" / "fake.jpg"
    fake.write_text("not an image\n")
    with pytest.raises(DataError) as exc:
        load_split("cifar10", "test", root, download=False)
    msg = _one_line_error(exc)
    assert msg.startswith(f"cannot read image {fake}: ") and "not an image" in msg


def test_in_memory_broken_symlink_fails_valid_symlink_works(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"train": CIFAR_CLASSES, "test": CIFAR_CLASSES})
    good = root / "train" / "c0" / "link.png"
    good.symlink_to(root / "test" / "c0" / "0.png")
    train = load_split("cifar10", "train", root, download=False)
    assert len(train) == 21
    with Image.open(root / "test" / "c0" / "0.png") as im:
        expected = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    assert torch.equal(train.images[2], expected)  # c0: 0.png, 1.png, link.png
    broken = root / "train" / "c5" / "broken.png"
    broken.symlink_to("/nonexistent")
    with pytest.raises(DataError) as exc:
        load_split("cifar10", "train", root, download=False)
    msg = _one_line_error(exc)
    assert str(broken) in msg and "broken symbolic link" in msg


@pytest.mark.parametrize("split", ["train", "test"])
def test_in_memory_class_folders_must_match(tmp_path: Path, split: str) -> None:
    root = _write_folder(tmp_path, {"train": CIFAR_CLASSES, "test": CIFAR_CLASSES})
    os.rename(root / "test" / "c0", root / "test" / "zz")
    with pytest.raises(DataError) as exc:
        load_split("cifar10", split, root, download=False)
    msg = _one_line_error(exc)
    assert "class folders differ" in msg
    assert "only in train/: c0" in msg and "only in test/: zz" in msg


# ---------------------------------------------------------------------------------- the CLI


def _train(data_dir: Path, dataset: str, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--method", "natural", "--dataset", dataset, "--data-dir", str(data_dir)]
    argv += ["--arch", "small_cnn", "--epochs", "1", "--batch-size", "4"]
    return [*argv, "--out", str(out / "run"), "--no-progress", "--device", "cpu", *extra]


def test_cli_streamed_bad_image_in_worker_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_folder(tmp_path / "d", {"train": ["a", "b"], "val": ["a", "b"]}, size=40)
    bad = root / "train" / "a" / "1.png"
    _truncate(bad, 50)
    rc = main(_train(root, "imagefolder", tmp_path, "--num-workers", "2"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # the run banner, then the error: one line, where the worker traceback used to be
    assert len(lines) == 2 and lines[0].startswith("actrain: natural on imagefolder")
    assert lines[1].startswith("actrain train: error: cannot read image") and str(bad) in lines[1]


def test_cli_cifar_folder_classes_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_folder(tmp_path / "d", {"train": CIFAR_CLASSES, "test": CIFAR_CLASSES})
    os.rename(root / "test" / "c0", root / "test" / "zz")
    rc = main(_train(root, "cifar10", tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "class folders differ" in err
    assert not (tmp_path / "run").exists()


def _cifar_pickles(folder: Path) -> None:
    import pickle

    folder.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
        (folder / f).write_bytes(pickle.dumps(batch))


def test_a_broken_cifar_folder_says_how_to_get_a_good_one(tmp_path):
    # a broken batches.meta ended in a traceback; a half-extracted download gave no way out
    from actrain.data import load_split

    folder = tmp_path / "cifar-10-batches-py"
    _cifar_pickles(folder)
    (folder / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="batches.meta is not a valid cifar10 meta file"):
        load_split("cifar10", "test", str(tmp_path), download=False)
    (folder / "batches.meta").unlink()
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match=f"missing data_batch_4 .*; delete {folder} and run"):
        load_split("cifar10", "train", str(tmp_path), download=False)


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    # every offline attempt left FashionMNIST/raw behind in the user's --data-dir
    from torchvision import datasets as tvd

    from actrain.data import load_split

    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision does before fetching
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    with pytest.raises(DataError, match="downloading it failed"):
        load_split("fashion_mnist", "train", str(tmp_path), download=True)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- subsets


@pytest.mark.parametrize("subset", [2.5, 0, -3, True, "10"])
def test_a_subset_that_is_not_a_whole_positive_number_is_refused(subset: object) -> None:
    # subset=2.5 ended in a raw TypeError from deep inside the indexing
    with pytest.raises(DataError, match=r"subset: must be a whole number of images >= 1"):
        load_split("digits", "train", subset=subset)  # type: ignore[arg-type]
    assert len(load_split("digits", "train", subset=np.int64(10))) == 10  # numpy ints are fine


def test_a_subset_larger_than_the_split_is_refused_naming_both_numbers(tmp_path: Path) -> None:
    # it was cut to the split without a word: 5000 asked for, 1437 trained on
    full = len(load_split("digits", "train"))
    assert full == 1437
    with pytest.raises(DataError, match=f"subset: 5000 images asked for, .* holds {full}"):
        load_split("digits", "train", subset=5000)
    assert len(load_split("digits", "train", subset=full)) == full  # all of it is fine
    root = _write_folder(tmp_path / "d", {"train": CIFAR_CLASSES, "test": CIFAR_CLASSES})
    with pytest.raises(DataError, match=r"subset: 21 images asked for, .* holds 20"):
        load_split("cifar10", "test", root, subset=21, download=False)


def test_cli_a_subset_larger_than_the_split_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dataset", "digits", "--arch", "small_cnn", "--epochs", "1"]
    argv += ["--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--test-subset", "400"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("actrain train: error: --test-subset: 400 images asked for")
    assert "digits test split holds 360" in err
    assert not (tmp_path / "run").exists()
