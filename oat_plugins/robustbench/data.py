"""Test data for RobustBench's protocol: the first n test images, ToTensor only, offline.

Sources accepted by :func:`load_data` (``data=``):

* ``None``: torchvision's CIFAR-10/100 test set under ``./data`` (never downloaded here).
* a folder holding torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``.
* an ImageFolder tree (``<class>/<image>``, or such a tree under ``test/``), or a ``.tar``,
  ``.tar.gz``, ``.tgz`` archive of one (e.g. ``cifar10-jpeg.tar.gz``). Class indices follow
  sorted class names (alphabetical = CIFAR's label order). The original test-set order is
  not recoverable from per-class files, so "first n" takes the images round-robin over the
  classes (image 0 of every class, then image 1, ...): a class-balanced, deterministic subset.
* a ``(x, y)`` pair of tensors (x in [0, 1], N×C×H×W) or a map-style torch Dataset.

Every loader returns ``(x, y, label)`` where ``label`` names the data for reports.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .entries import check_dataset

__all__ = ["load_data", "robustbench_local_data", "NUM_CLASSES"]

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_TV_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_TV_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_KNOWN_ARCHIVES = {"cifar10-jpeg": "CIFAR-10 (JPEG q75)"}
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def _to_tensor(img: Any) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    from torchvision.transforms.functional import to_tensor

    if hasattr(img, "convert"):
        img = img.convert("RGB")
    return to_tensor(img)


def _interleave(per_class: list[list[Any]], n: int | None) -> list[tuple[Any, int]]:
    out: list[tuple[Any, int]] = []
    depth = max((len(items) for items in per_class), default=0)
    for i in range(depth):
        for cls, items in enumerate(per_class):
            if i < len(items):
                out.append((items[i], cls))
                if n is not None and len(out) == n:
                    return out
    return out


def _stack(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _from_tar(path: Path, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    # reading a .tar.gz index means decompressing all of it: remember recent reads
    stat = path.stat()
    x, y = _from_tar_cached(path.resolve(), stat.st_mtime_ns, stat.st_size, n)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=4)
def _from_tar_cached(path: Path, mtime_ns: int, size: int,
                     n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    with tarfile.open(path, "r:*") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.lower().endswith(_IMAGE_EXT)]
        parts = [Path(m.name).parts for m in members]
        root: tuple[str, ...] = ()
        if any(len(p) >= 3 and p[-3] == "test" for p in parts):
            root = ("test",)
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for m, p in zip(members, parts, strict=True):
            if root and (len(p) < 3 or p[-3] != "test"):
                continue
            if len(p) < 2:
                continue
            by_class.setdefault(p[-2], []).append(m)
        if not by_class:
            raise ValueError(f"{path}: no <class>/<image> files found in the archive")
        classes = sorted(by_class)
        per_class = [sorted(by_class[c], key=lambda m: m.name) for c in classes]
        chosen = _interleave(per_class, n)
        order = sorted(range(len(chosen)), key=lambda i: chosen[i][0].offset)
        images: list[torch.Tensor | None] = [None] * len(chosen)
        for i in order:
            member, _ = chosen[i]
            raw = tar.extractfile(member)
            assert raw is not None
            with Image.open(io.BytesIO(raw.read())) as img:
                images[i] = _to_tensor(img)
    return _stack(images, [c for _, c in chosen])  # type: ignore[arg-type]


def _from_folder(path: Path, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    if (path / "test").is_dir():
        path = path / "test"
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{path}: expected one sub-folder per class")
    per_class = [sorted(f for f in (path / c).iterdir() if f.suffix.lower() in _IMAGE_EXT)
                 for c in classes]
    chosen = _interleave(per_class, n)
    images = []
    for file, _ in chosen:
        with Image.open(file) as img:
            images.append(_to_tensor(img))
    return _stack(images, [c for _, c in chosen])


def _from_dataset(ds: Dataset, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    total = len(ds)  # type: ignore[arg-type]
    count = total if n is None else min(n, total)
    images, labels = [], []
    for i in range(count):
        img, label = ds[i]
        images.append(_to_tensor(img))
        labels.append(int(label))
    return _stack(images, labels)


def _from_torchvision(dataset: str, root: Path, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    ds = cls(root=str(root), train=False, download=False)
    return _from_dataset(ds, n)


def _default_label(dataset: str, data: Any) -> str:
    if data is None:
        return _TV_LABELS[dataset]
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        stem = path.name.split(".")[0]
        if stem in _KNOWN_ARCHIVES:
            return _KNOWN_ARCHIVES[stem]
        if (path / _TV_DIRS[dataset]).is_dir():
            return _TV_LABELS[dataset]
        return f"{_TV_LABELS[dataset]} images from {path.name}"
    if isinstance(data, Dataset):
        return type(data).__name__
    return "user-supplied tensors"


def load_data(
    dataset: str,
    n_examples: int | None,
    data: Any = None,
    data_label: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n_examples`` test images of ``data`` (see the module docstring).

    Returns ``(x, y, label)``: x float in [0, 1] (N×C×H×W), y long labels, and a label naming
    the data (``data_label`` if given). Raises ValueError for bad input, FileNotFoundError
    when no local copy is found.
    """
    dataset = check_dataset(dataset)
    if n_examples is not None and (not isinstance(n_examples, int) or n_examples < 1):
        raise ValueError(f"n_examples must be a positive int, got {n_examples!r}")
    label = data_label or _default_label(dataset, data)
    if data is None:
        root = Path("./data")
        if not (root / _TV_DIRS[dataset]).is_dir():
            raise FileNotFoundError(
                f"no local {_TV_LABELS[dataset]} test set under {root.resolve()}; pass data= "
                "(a folder with torchvision's files, an image folder or archive, or (x, y))"
            )
        x, y = _from_torchvision(dataset, root, n_examples)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError("data=(x, y) must be two tensors")
        if n_examples is not None:
            x, y = x[:n_examples], y[:n_examples]
        x, y = x.float(), y.long()
    elif isinstance(data, Dataset):
        x, y = _from_dataset(data, n_examples)
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist")
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise ValueError(f"{path}: expected a .tar/.tar.gz archive of an image folder")
            x, y = _from_tar(path, n_examples)
        elif (path / _TV_DIRS[dataset]).is_dir():
            x, y = _from_torchvision(dataset, path, n_examples)
        else:
            x, y = _from_folder(path, n_examples)
    else:
        raise ValueError(f"unsupported data= {type(data).__name__}")

    if x.ndim != 4 or x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"expected x of shape N×C×H×W and y of shape N, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if n_examples is not None and x.shape[0] < n_examples:
        raise ValueError(f"asked for {n_examples} images but the data has only {x.shape[0]}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("images must be in [0, 1] (ToTensor only, no normalisation)")
    if y.numel() and (y.min() < 0 or y.max() >= NUM_CLASSES[dataset]):
        raise ValueError(f"labels out of range for {dataset}")
    return x.contiguous(), y, label


@contextmanager
def robustbench_local_data(dataset: str, data: Any) -> Iterator[None]:
    """Point robustbench's own clean-data loader for ``dataset`` at local ``data``.

    Inside the block, ``robustbench.eval.benchmark(..., dataset=dataset)`` reads its test
    images through :func:`load_data` instead of downloading CIFAR. Restored on exit.
    """
    from . import compat

    dataset = check_dataset(dataset)
    compat.install()
    import robustbench.data as rb_data
    from robustbench.model_zoo.enums import BenchmarkDataset

    key = BenchmarkDataset(dataset)

    def loader(n_examples: int | None, data_dir: str, prepr: Any) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
        x, y, _ = load_data(dataset, n_examples, data)
        return x, y

    previous = rb_data._clean_dataset_loaders[key]
    rb_data._clean_dataset_loaders[key] = loader
    try:
        yield
    finally:
        rb_data._clean_dataset_loaders[key] = previous
