"""Datasets (oat_plugins.data): the bundled CIFAR-10 sample, ImageFolder paths, errors."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from oat_plugins import data
from oat_plugins.data import (
    CIFAR10_MEAN,
    DATASETS,
    bundled_cifar10,
    dataset_stats,
    load_dataset,
    num_classes,
    train_transform,
)


def test_bundled_sample_file_is_small_and_holds_original_jpeg_bytes():
    path = resources.files("oat_plugins.data").joinpath("cifar10_sample.npz")
    assert path.is_file()
    size = len(path.read_bytes())
    assert size <= 5_000_000, size
    with np.load(path) as archive:
        assert list(archive["classes"]) == list(data.BUNDLED_CLASSES)
        for split, n in (("train", 4000), ("test", 1000)):
            offsets, jpeg = archive[f"{split}_offsets"], archive[f"{split}_jpeg"]
            assert offsets.shape == (n + 1,) and offsets[0] == 0 and offsets[-1] == jpeg.size
            assert np.all(np.diff(offsets) > 0)
            first = jpeg[offsets[0]:offsets[1]].tobytes()
            assert first[:2] == b"\xff\xd8" and first[-2:] == b"\xff\xd9"  # a whole JPEG
            with Image.open(io.BytesIO(first)) as img:
                assert img.format == "JPEG" and img.size == (32, 32)


@pytest.mark.parametrize(("split", "n"), [("train", 4000), ("test", 1000)])
def test_bundled_cifar10_is_class_balanced_images_in_unit_range(split, n):
    ds = bundled_cifar10(split, augment=False)
    assert len(ds) == n
    assert torch.bincount(ds.labels, minlength=10).tolist() == [n // 10] * 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    mean = torch.stack([ds[i][0] for i in range(200)]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(CIFAR10_MEAN), atol=0.05, rtol=0)


def test_train_split_is_augmented_and_test_split_is_not():
    test = load_dataset("bundled", "test")
    assert torch.equal(test[3][0], test[3][0])
    train = load_dataset("bundled", "train")
    plain = bundled_cifar10("train", augment=False)[3][0]
    views = [train[3][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(v, plain) for v in views)
    # A crop with padding 4 is the image shifted by at most 4 pixels (zeros filled in), or
    # its mirror image.
    for view in views:
        assert any(
            torch.equal(view[:, max(0, -dy):32 - max(0, dy), max(0, -dx):32 - max(0, dx)],
                        img[:, max(0, dy):32 + min(0, dy), max(0, dx):32 + min(0, dx)])
            for img in (plain, plain.flip(-1))
            for dy in range(-4, 5) for dx in range(-4, 5)
        )


def test_train_transform_is_seeded_by_torch():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    t = train_transform(32)
    torch.manual_seed(1)
    a = [t(image) for _ in range(4)]
    torch.manual_seed(1)
    b = [t(image) for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_unknown_dataset_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown dataset"):
        num_classes("mnist")


def test_bad_split_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_dataset("bundled", "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("./no/such/folder")


def test_malformed_image_folders_give_clear_errors(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a dataset")
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(empty)
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a usable ImageFolder"):
        load_dataset(no_images)
    only_train = tmp_path / "only_train"
    (only_train / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no test/ or val/"):
        load_dataset(only_train, "test")


def _write_images(root, classes, n, size=(32, 32)):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


def test_image_folder_with_splits(tmp_path):
    _write_images(tmp_path / "train", ["a", "b", "c"], 2)
    _write_images(tmp_path / "val", ["a", "b", "c"], 1)
    train = load_dataset(tmp_path, "train")
    test = load_dataset(str(tmp_path), "test")
    assert len(train) == 6 and len(test) == 3
    assert num_classes(tmp_path) == 3
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert dataset_stats(tmp_path) is None


def test_image_folder_without_splits_resized(tmp_path):
    _write_images(tmp_path, ["x", "y"], 2, size=(40, 48))
    ds = load_dataset(tmp_path, "train", image_size=24)
    assert len(ds) == 4 and ds[0][0].shape == (3, 24, 24)
    assert load_dataset(tmp_path, "test", image_size=24)[0][0].shape == (3, 24, 24)


def test_torchvision_dataset_missing_offline_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10 .* not available") as info:
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert "download" in str(info.value)


def test_num_classes_and_stats_of_named_datasets():
    assert [num_classes(n) for n in ("cifar10", "cifar100", "svhn", "bundled")] == [
        10, 100, 10, 10]
    assert dataset_stats("CIFAR10") == dataset_stats("bundled")
    assert dataset_stats("svhn") != dataset_stats("cifar10")



def test_small_image_folders_are_decoded_into_memory_with_the_same_images(tmp_path):
    """Decoded once (default for small data) or read per item: the same tensors, with and
    without resizing, and with augmentation under the same seed."""
    from oat_plugins.data import TensorImageDataset

    _write_images(tmp_path, ["a", "b"], 3, size=(40, 48))
    for split, size in (("test", None), ("test", 24), ("train", 24)):
        kept = load_dataset(tmp_path, split, image_size=size)
        read = load_dataset(tmp_path, split, image_size=size, in_memory=False)
        assert isinstance(kept, TensorImageDataset) and not isinstance(read, TensorImageDataset)
        assert kept.classes == ("a", "b") and len(kept) == len(read) == 6
        for i in range(len(read)):
            torch.manual_seed(i)
            x_kept, y_kept = kept[i]
            torch.manual_seed(i)
            x_read, y_read = read[i]
            assert y_kept == y_read and torch.equal(x_kept, x_read)


def test_image_folders_of_mixed_sizes_stay_on_disk_unless_resized(tmp_path):
    from oat_plugins.data import TensorImageDataset

    _write_images(tmp_path / "small", ["a"], 1, size=(16, 16))
    _write_images(tmp_path / "large", ["b"], 1, size=(20, 20))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (tmp_path / "small" / "a").rename(mixed / "a")
    (tmp_path / "large" / "b").rename(mixed / "b")
    assert not isinstance(load_dataset(mixed, "test"), TensorImageDataset)
    with pytest.raises(ValueError, match="one size"):
        load_dataset(mixed, "test", in_memory=True)
    assert isinstance(load_dataset(mixed, "test", image_size=8), TensorImageDataset)
