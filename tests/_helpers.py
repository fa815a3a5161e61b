"""Helpers shared by several test files (imported as ``from _helpers import ...`` after putting
this folder on ``sys.path``, like train_helpers.py: a package named ``tests`` would clash with
robustbench's own).

Everything here uses only what the package ships: the bundled CIFAR-10 sample, never data
outside the repository."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from oat_plugins.data import BUNDLED_CLASSES, load_dataset
from oat_plugins.layers import DualNorm


def perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move the parameters and statistics of every dual norm (and its FiLM) away from their
    initial values, so that branches and FiLM layers really differ (a fresh identity-init
    model would make the tests trivial). Convs stay as initialised to keep logits in a sane
    range for the float32 tolerance."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for dual in (m for m in model.modules() if isinstance(m, DualNorm)):
            for p in dual.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
            for name, b in dual.named_buffers():
                if name.endswith("running_var"):
                    b.mul_(1 + torch.rand(b.shape, generator=g))
                elif name.endswith("running_mean"):
                    b.add_(scale * torch.randn(b.shape, generator=g))
    return model


def bundled_uint8(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split of the bundled CIFAR-10 sample as uint8 (N, 3, 32, 32), and
    their labels."""
    data = load_dataset("bundled", split, augment=False)
    return data.images, data.labels


def bundled_images(n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` bundled images as float in [0, 1], and their labels."""
    images, labels = bundled_uint8(split)
    return images[:n].float() / 255, labels[:n].clone()


def per_class(k: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` bundled images of every class, class by class: uint8 images, labels."""
    images, labels = bundled_uint8(split)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in range(10)])
    return images[idx], labels[idx]


def write_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor,
                       classes: tuple[str, ...] = BUNDLED_CLASSES) -> Path:
    """Write uint8 images as lossless PNGs ``root/<class>/<NNNN>.png`` (numbered per class in
    the given order); every class gets a folder, empty or not, so indices follow ``classes``."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    counts = [0] * len(classes)
    for image, label in zip(images, labels.tolist(), strict=True):
        path = root / classes[label] / f"{counts[label]:04d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        counts[label] += 1
    return root
