"""Tiny model, data and config shared by the training tests and tests/train_script.py."""

from __future__ import annotations

import timm
import torch
from torch.utils.data import Subset

import oat_plugins
from oat_plugins.data import CIFAR10_MEAN, CIFAR10_STD, load_dataset
from oat_plugins.train import TrainConfig

TINY_KWARGS = {"channels": (8, 16, 32, 64), "stem_width": 8}
N_TRAIN = 48
BATCH = 16


def tiny_model(seed: int = 0, method: str = "film", **options) -> oat_plugins.ConditionalModel:
    """timm's resnet10t with 8-64 channels (~0.2 M parameters once wrapped) with ``method``."""
    torch.manual_seed(seed)
    backbone = timm.create_model("resnet10t", num_classes=10, **TINY_KWARGS)
    return oat_plugins.wrap(backbone, method, normalize=(CIFAR10_MEAN, CIFAR10_STD),
                            model_kwargs=dict(TINY_KWARGS), **options)


def tiny_data(n: int = N_TRAIN, split: str = "train") -> Subset:
    return Subset(load_dataset("bundled", split), range(n))


def tiny_config(**overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=BATCH, lr=0.05, steps=1, log_every=0, progress=False)
    values.update(overrides)
    return TrainConfig(**values)
