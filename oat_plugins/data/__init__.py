"""Datasets for training and evaluation: CIFAR-10/100 and SVHN (torchvision), any ImageFolder
directory, and a small CIFAR-10 sample shipped inside the package (the demo's default).

Every dataset yields ``(image, label)`` with ``image`` a float tensor in [0, 1] of shape
(C, H, W): models wrapped by :func:`oat_plugins.wrap` normalise internally.

>>> from oat_plugins.data import load_dataset
>>> train = load_dataset("bundled", "train")           # 4,000 images, augmented
>>> test = load_dataset("bundled", "test")             # 1,000 images, not augmented
>>> train = load_dataset("cifar10", "train", data_dir="~/data")   # downloads when online
>>> few = balanced_subset(train, 2000, seed=0)           # 200 images of every class
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

__all__ = [
    "BUNDLED_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DeviceImageDataset",
    "SVHN_MEAN",
    "SVHN_STD",
    "TensorImageDataset",
    "balanced_subset",
    "bundled_cifar10",
    "dataset_labels",
    "dataset_stats",
    "default_data_dir",
    "load_dataset",
    "num_classes",
    "random_crop_flip",
    "train_transform",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "bundled")
"""Dataset names accepted by :func:`load_dataset` (besides a path to an ImageFolder)."""

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "bundled": 10}
_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "bundled": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "svhn": (SVHN_MEAN, SVHN_STD),
}
_SPLITS = ("train", "test")
_SAMPLE_FILE = "cifar10_sample.npz"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

BUNDLED_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

_bundled_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def default_data_dir() -> Path:
    """Where torchvision datasets are stored: ``$OAT_PLUGINS_DATA`` or
    ``~/.cache/oat-plugins/data``."""
    return Path(os.environ.get("OAT_PLUGINS_DATA", "~/.cache/oat-plugins/data")).expanduser()


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) with int64 labels (N,).

    ``transform`` maps a uint8 (C, H, W) tensor to the returned image; the default converts
    to float in [0, 1].
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        classes: tuple[str, ...] | None = None,
    ) -> None:
        _check_images(images, labels)
        self.images = images
        self.labels = labels.long()
        self.transform = transform if transform is not None else _to_float
        self.classes = classes

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> list[int]:
        """The labels as a list (the attribute ImageFolder and torchvision datasets have)."""
        return self.labels.tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def _check_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got "
                         f"{images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                         f"{tuple(labels.shape)}")


class DeviceImageDataset(Dataset):
    """Uint8 images (N, C, H, W) and labels (N,) held on one device (e.g. the GPU), turned
    into float images in [0, 1] there a whole batch at a time, optionally with the standard
    augmentation (:func:`random_crop_flip`) done batch-wise on that device.

    A ``DataLoader`` with ``num_workers=0`` fetches each batch with one :meth:`__getitems__`
    call, so a GPU training step spends no time on per-sample CPU transforms or host-to-device
    copies. The augmentation samples the distribution of :func:`train_transform` (the draws
    differ) from the device's global generator, which ``fit`` seeds at every step.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        device: str | torch.device | None = None,
        augment: bool = False,
        padding: int | None = None,
        flip: bool = True,
        classes: tuple[str, ...] | None = None,
    ) -> None:
        _check_images(images, labels)
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.augment, self.flip, self.classes = augment, flip, classes
        self.padding = images.shape[-1] // 8 if padding is None else padding

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([index], device=self.device))
        return x[0], int(y[0])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The samples at ``indices``, made in one batch (``default_collate`` stacks them)."""
        x, y = self.batch(torch.as_tensor(indices, device=self.device))
        return list(zip(x.unbind(0), y.unbind(0), strict=True))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float images in [0, 1], labels) at ``indices``, augmented when ``augment``."""
        images = self.images[indices]
        if self.augment:
            images = random_crop_flip(images, self.padding, flip=self.flip)
        return _to_float(images), self.labels[indices]


def random_crop_flip(images: torch.Tensor, padding: int, *, flip: bool = True) -> torch.Tensor:
    """Each image of the batch (B, C, H, W) cropped to (H, W) at a random offset after zero
    padding by ``padding``, then mirrored left-right with probability 1/2 when ``flip``: the
    crop and flip of :func:`train_transform`, drawn per sample with tensor ops on the batch's
    device (its global generator)."""
    b, _, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=dev)
    left = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=dev)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    if flip:
        cols = torch.where(torch.rand(b, 1, 1, device=dev) < 0.5, w - 1 - cols, cols)
    rows = top + torch.arange(h, device=dev).view(1, h, 1)
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    # advanced indices around a slice put their (B, H, W) dims first: (B, H, W, C)
    return padded[batch, :, rows, left + cols].permute(0, 3, 1, 2)


def _to_float(image: torch.Tensor) -> torch.Tensor:
    # The same arithmetic as the augmenting transforms' ToDtype, bit for bit.
    return v2.functional.to_dtype(image, torch.float32, scale=True)


def train_transform(size: int = 32, *, padding: int | None = None, flip: bool = True) -> v2.Compose:
    """Standard augmentation: random crop of ``size`` after zero padding (default size // 8,
    i.e. 4 for 32x32), random horizontal flip, then float in [0, 1]. Works on PIL images and
    uint8 tensors; randomness comes from torch's global generator (seeded by the trainer)."""
    ops: list[Any] = [v2.ToImage(), v2.RandomCrop(size, padding=size // 8 if padding is None
                                                  else padding)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def eval_transform(size: int | None = None) -> v2.Compose:
    """No augmentation: (optionally resize and centre-crop to ``size``,) float in [0, 1]."""
    return v2.Compose(_fit_to_size(size) + [v2.ToDtype(torch.float32, scale=True)])


def _decode_split(archive: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    jpeg, offsets = archive[f"{split}_jpeg"], archive[f"{split}_offsets"]
    labels = torch.from_numpy(archive[f"{split}_labels"].astype(np.int64))
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i in range(len(labels)):
        data = jpeg[offsets[i]:offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(data)) as img:
            images[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def bundled_cifar10(
    split: str = "train",
    *,
    augment: bool | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TensorImageDataset:
    """The CIFAR-10 sample shipped with the package: 4,000 train and 1,000 test images,
    class balanced (JPEG q75 re-encoding of CIFAR-10; see ``tools/make_bundled_sample.py``).

    Decoded once per process and cached in memory. ``augment`` (default: for the train
    split) applies :func:`train_transform`; ``transform`` replaces it.
    """
    _check_split(split)
    if split not in _bundled_cache:
        ref = resources.files(__name__).joinpath(_SAMPLE_FILE)
        with resources.as_file(ref) as path:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"the bundled CIFAR-10 sample {_SAMPLE_FILE} is missing from "
                    "oat_plugins/data; rebuild it with tools/make_bundled_sample.py"
                )
            with np.load(path) as archive:
                _bundled_cache[split] = _decode_split(archive, split)
    images, labels = _bundled_cache[split]
    if transform is None:
        augment = split == "train" if augment is None else augment
        transform = train_transform(32) if augment else None
    return TensorImageDataset(images, labels, transform, classes=BUNDLED_CLASSES)


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def _is_known(spec: object) -> bool:
    return isinstance(spec, str) and spec.lower() in DATASETS


def _unknown(spec: object) -> ValueError:
    return ValueError(
        f"unknown dataset {spec!r}; use one of {', '.join(DATASETS)} or a path to an "
        "ImageFolder directory (class sub-folders of images, optionally under train/ and test/)"
    )


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith((".", "~")) or (os.altsep or "\0") in spec


def _image_folder_root(path: Path, split: str) -> Path:
    """``path/<split>`` when the directory is split (``test`` also found as ``val``), else
    ``path`` itself."""
    if not path.exists():
        raise FileNotFoundError(f"dataset path {os.fspath(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"dataset path {os.fspath(path)!r} is not a directory; an ImageFolder dataset is a "
            "directory of class sub-folders holding images"
        )
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (path / name).is_dir():
            return path / name
    if split == "test" and (path / "train").is_dir():
        raise ValueError(f"{os.fspath(path)!r} has a train/ folder but no test/ or val/ folder")
    return path


def _image_folder(path: Path, split: str, transform: Callable | None):
    from torchvision.datasets import ImageFolder

    root = _image_folder_root(path, split)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{os.fspath(root)!r} holds no class sub-folders; an ImageFolder dataset is "
            "<root>/<class>/<image> (optionally <root>/train/... and <root>/test/...)"
        )
    try:
        return ImageFolder(os.fspath(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(
            f"{os.fspath(root)!r} is not a usable ImageFolder dataset (class folders "
            f"{classes[:5]}...; image suffixes {', '.join(_IMAGE_SUFFIXES)}): {err}"
        ) from None


def load_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
    transform: Callable | None = None,
    download: bool = True,
    image_size: int | None = None,
    in_memory: bool | None = None,
) -> Dataset:
    """A dataset of ``(image in [0, 1], label)`` pairs.

    Args:
        spec: ``'cifar10'``, ``'cifar100'``, ``'svhn'`` (torchvision, stored under
            ``data_dir``), ``'bundled'`` (the CIFAR-10 sample in the package), or a path to an
            ImageFolder directory (``<root>/<class>/<image>``, or with ``train/`` and
            ``test/`` (or ``val/``) sub-directories).
        split: ``'train'`` or ``'test'``.
        data_dir: root for torchvision datasets (default :func:`default_data_dir`).
        augment: random crop with padding and horizontal flip (no flip for SVHN digits);
            default: on for the train split.
        transform: replaces the default transform entirely (input: a PIL image, or a uint8
            (C, H, W) tensor for ``'bundled'``).
        download: let torchvision download a missing dataset (needs internet).
        image_size: for ImageFolder data, resize and crop images to this size (needed when
            images differ in size); torchvision datasets are 32x32.
        in_memory: for ImageFolder data with the default transforms, decode every image
            once (resized and cropped to ``image_size``) into a uint8 tensor held in memory
            (:class:`TensorImageDataset`), so a batch costs its augmentation only, not file
            reads and JPEG decoding. ``None`` (default): when the decoded split takes at most
            :data:`IN_MEMORY_LIMIT_BYTES` (CIFAR-sized data, not ImageNet) and its images share
            one size. The images and augmentation are the same either way.
    """
    _check_split(split)
    augment = split == "train" if augment is None else augment
    if isinstance(spec, str) and _is_known(spec):
        name = spec.lower()
        if name == "bundled":
            return bundled_cifar10(split, augment=augment, transform=transform)
        if transform is None:
            transform = (train_transform(32, flip=name != "svhn") if augment
                         else eval_transform())
        return _torchvision(name, split, data_dir, transform, download)
    if isinstance(spec, str) and not _looks_like_path(spec) and not os.path.exists(spec):
        raise _unknown(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise _unknown(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset path {os.fspath(spec)!r} does not exist (a --data / spec is one of "
            f"{', '.join(DATASETS)} or an existing ImageFolder directory)"
        )
    if transform is None and in_memory is not False:
        folder = _image_folder(path, split, None)
        decoded = _decoded_folder(folder, image_size, required=bool(in_memory))
        if decoded is not None:
            images, labels = decoded
            size = images.shape[-1]
            return TensorImageDataset(images, labels, train_transform(size) if augment else None,
                                      classes=tuple(folder.classes))
    if transform is None:
        if augment:
            size = image_size or 32
            transform = v2.Compose(_fit_to_size(image_size) + [train_transform(size)])
        else:
            transform = eval_transform(image_size)
    return _image_folder(path, split, transform)


IN_MEMORY_LIMIT_BYTES = 2 << 30
"""Largest decoded ImageFolder split :func:`load_dataset` holds in memory by default (2 GiB:
CIFAR-10's 50,000 training images take 154 MB)."""


def _fit_to_size(image_size: int | None) -> list[Any]:
    """PIL image → uint8 tensor, resized and centre-cropped to ``image_size`` when given."""
    ops: list[Any] = [v2.ToImage()]
    if image_size is not None:
        ops += [v2.Resize(image_size), v2.CenterCrop(image_size)]
    return ops


def _decoded_folder(folder: Any, image_size: int | None, required: bool
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All images of an ImageFolder as one uint8 (N, C, H, W) tensor and their labels, or
    None (unless ``required``) when they would exceed :data:`IN_MEMORY_LIMIT_BYTES` or differ
    in size. Decoded by a thread pool (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    to_tensor = v2.Compose(_fit_to_size(image_size))

    def decode(index: int) -> torch.Tensor:
        return to_tensor(folder.loader(folder.samples[index][0]))

    first = decode(0)
    too_big = first.numel() * len(folder) > IN_MEMORY_LIMIT_BYTES
    if too_big and not required:
        return None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(decode, range(len(folder))))
    if any(image.shape != first.shape for image in images):
        if required:
            raise ValueError(f"in_memory=True needs images of one size; {folder.root!r} has "
                             "several: pass image_size to resize them")
        return None
    labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
    return torch.stack(images), labels


def _torchvision(name: str, split: str, data_dir, transform, download: bool) -> Dataset:
    from torchvision import datasets

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root.exists() and not root.is_dir():
        raise ValueError(f"data_dir {os.fspath(root)!r} is not a directory")
    try:
        if name == "svhn":
            return datasets.SVHN(os.fspath(root / "svhn"), split=split, transform=transform,
                                 download=download)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(os.fspath(root), train=split == "train", transform=transform,
                   download=download)
    except (RuntimeError, OSError) as err:
        hint = ("download it once with download=True (needs internet)" if not download else
                "the download failed (no internet?); put the torchvision files there or use "
                "'bundled' / an ImageFolder path")
        raise FileNotFoundError(
            f"{name} ({split}) is not available under {os.fspath(root)!r}: {hint} ({err})"
        ) from None


def num_classes(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> int:
    """Number of classes of a dataset spec (for an ImageFolder path, its class folders)."""
    if isinstance(spec, str) and _is_known(spec):
        return _NUM_CLASSES[spec.lower()]
    if isinstance(spec, str) and not _looks_like_path(spec) and not os.path.exists(spec):
        raise _unknown(spec)
    root = _image_folder_root(Path(spec).expanduser(), "train")
    classes = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        raise ValueError(f"{os.fspath(root)!r} holds no class sub-folders")
    return len(classes)


def dataset_stats(spec: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per channel of a named dataset, for ``wrap(..., normalize=...)``; None for
    an ImageFolder path (use the backbone's own, ``normalize='auto'``)."""
    if isinstance(spec, str) and _is_known(spec):
        return _STATS[spec.lower()]
    return None


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The label of every item of ``dataset`` (int64, in order), read without loading images
    where the dataset keeps them: ``targets`` (ImageFolder, torchvision CIFAR), ``labels``
    (SVHN, :class:`TensorImageDataset`), a :class:`~torch.utils.data.Subset` of such a
    dataset. Any other dataset is read item by item (``dataset[i][1]``), which loads every
    image once."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices),
                                                               dtype=torch.long)]
    size = len(dataset)  # type: ignore[arg-type]
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if isinstance(values, torch.Tensor) and len(values) == size:
            return values.to("cpu", torch.long)  # e.g. DeviceImageDataset's, on the GPU
        if values is not None and len(values) == size:
            return torch.as_tensor(np.asarray(values), dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(size)], dtype=torch.long)


def balanced_subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded, class-balanced subset of ``n`` items of ``dataset`` (the dataset itself when
    ``n`` is at least its size).

    Every class gets ``n // classes`` or one more item (a class with too few items gives all
    it has and the others make up the rest); which items, and which classes get the extra
    ones, is drawn with ``seed``. Use it rather than the first ``n`` items, which for data
    sorted by class (an ImageFolder) are a few classes only. The chosen indices keep the
    dataset's order. Labels are read as :func:`dataset_labels` reads them.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    size = len(dataset)  # type: ignore[arg-type]
    if n >= size:
        return dataset
    labels = dataset_labels(dataset)
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    class_order = torch.randperm(len(classes), generator=generator)
    indices, keys = [], []
    for position, c in zip(class_order.tolist(), classes.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        indices.append(members)
        # round r of the round robin over classes, in the drawn class order
        keys.append(torch.arange(len(members)) * len(classes) + position)
    chosen = torch.cat(indices)[torch.cat(keys).argsort()[:n]]
    return Subset(dataset, chosen.sort().values.tolist())
